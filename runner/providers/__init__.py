"""Providers: one protocol (quote · complete · models) over the Run API and OpenAI-compatible APIs."""

from runner.providers.base import Provider, classify, error_from_response

__all__ = ["Provider", "classify", "error_from_response"]
