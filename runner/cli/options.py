"""The options shared by commands: the run settings declared in runner.core.config become typer
options here, so `run`, `resume`, `sweep` and `estimate` take the same flags from one declaration.

`@config_options("run")` adds to a command every setting whose declaration names "run", and hands the
command their values, as typed, in one dictionary (`flags`): the command builds its RunConfig from it
(`RunConfig.from_flags`, or `with_flags` on a configuration kept in the ledger)."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from runner.core.config import flags_of

F = TypeVar("F", bound=Callable[..., Any])
Flags = dict[str, Any]  # the values of a command's run settings, as typed, by field name

JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document (money as decimal strings).")]
DbOpt = Annotated[
    str | None, typer.Option("--db", help="Ledger location (sqlite:///PATH); default RUNNER_DB.")
]


def config_options(command: str) -> Callable[[F], F]:
    """Give the decorated command the run settings `command` takes, as keyword-only options; it
    receives their values in its `flags` parameter."""
    settings = flags_of(command)

    def decorate(func: F) -> F:
        hints = typing.get_type_hints(func, include_extras=True)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(func).parameters.values()
            if p.name != "flags"
        ]
        added = [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=Annotated[spec.cli_type, typer.Option(*spec.names, help=spec.help)],
            )
            for name, spec, default in settings
        ]
        names = {name for name, _, _ in settings}

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            flags = {name: kwargs.pop(name) for name in list(kwargs) if name in names}
            return func(*args, flags=flags, **kwargs)

        params = own + added
        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return typing.cast(F, wrapper)

    return decorate
