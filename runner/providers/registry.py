"""Pick and open a provider by name: each provider is a module with a `connect(settings)` opener,
and one line here."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from runner.core.config import ProviderSettings
from runner.core.errors import ConfigError
from runner.providers import openai, orthogonal, simulated
from runner.providers.connection import Connection

# --provider NAME → how to open it: a new provider is a module of its own and one line here
PROVIDERS: dict[str, Callable[[ProviderSettings], AbstractAsyncContextManager[Connection]]] = {
    "orthogonal": orthogonal.connect,
    "openai": openai.connect,
    "simulator": simulated.connect,
}


def connect(settings: ProviderSettings) -> AbstractAsyncContextManager[Connection]:
    opener = PROVIDERS.get(settings.name)
    if opener is None:
        msg = f"unknown provider '{settings.name}'; choose one of {', '.join(PROVIDERS)}"
        raise ConfigError(msg)
    return opener(settings)


def provider_of_scope(scope: str) -> tuple[str, str | None, str]:
    """(provider, base URL, simulator pricing) from a connection's scope, as a run records it: the
    openers below write `orthogonal:BASE:API`, `openai:BASE` or `simulator:PRICING`."""
    name, _, rest = scope.partition(":")
    if name == "simulator":
        return name, None, rest or "tokens"
    if name == "orthogonal":
        return name, rest.rpartition(":")[0] or None, "tokens"
    return name, rest or None, "tokens"


__all__ = ["PROVIDERS", "Connection", "connect", "provider_of_scope"]
