"""The one exception tree of runner.

    RunnerError                      anything runner raises on purpose
    ├── JobError                     a job file cannot be used (carries every issue found)
    ├── SpecError                    a sweep's spec or dataset cannot be used (names the file and key)
    ├── ConfigError                  a setting, flag or price file is wrong
    ├── LedgerError                  the ledger refused an operation
    │   ├── LedgerUnavailable        the ledger cannot be read or written (damaged, disk full, gone)
    │   ├── BudgetNotFound
    │   ├── BudgetExceeded           a reservation does not fit the budget
    │   ├── Unpriced                 requests without a price cannot be reserved
    │   ├── BudgetLimitTooLow        a budget cannot go below spent + reserved
    │   ├── JobChanged               a line changed since its run began
    │   └── RunBusy                  other workers send the run, or took this one over
    └── ProviderError                a provider answered with an error, or could not be reached
        ├── RetryableError           408, 409, 429, 5xx, connect/read errors: try again
        ├── RequestFatalError        400, 404, 413, 422: this request will never succeed
        ├── RunFatalError            401, 402, spend limits, TLS / unknown host: stop the whole run
        └── OutcomeUnknown           the request may have been billed (read timeout after sending)

Errors carry their context as keyword-only attributes; messages never contain the API key.
"""

from __future__ import annotations

from dataclasses import dataclass


class RunnerError(Exception):
    """Base of every error runner raises on purpose."""


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem found in a job file, pointing at the file, line and field."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        """file:line: field: message, with anything from the job file escaped for a terminal."""
        where = f"{self.file}:{self.line}" if self.line else self.file
        text = f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        return printable(text)


class JobError(RunnerError):
    def __init__(self, msg: str, *, issues: list[Issue], total: int) -> None:
        super().__init__(msg)
        self.issues = issues
        self.total = total


class SpecError(RunnerError):
    """A sweep spec (or its dataset) cannot be used: names the file, the key and the row."""


class ConfigError(RunnerError):
    pass


class LedgerError(RunnerError):
    pass


class LedgerUnavailable(LedgerError):
    def __init__(self, msg: str, *, path: str, reason: str) -> None:
        super().__init__(msg)
        self.path = path
        self.reason = reason


class BudgetNotFound(LedgerError):
    def __init__(self, msg: str, *, budget: str) -> None:
        super().__init__(msg)
        self.budget = budget


class BudgetExceeded(LedgerError):
    def __init__(self, msg: str, *, budget: str, shortfall_nanos: int) -> None:
        super().__init__(msg)
        self.budget = budget
        self.shortfall_nanos = shortfall_nanos


class BudgetLimitTooLow(LedgerError):
    pass


class Unpriced(LedgerError):
    def __init__(self, msg: str, *, count: int) -> None:
        super().__init__(msg)
        self.count = count


class JobChanged(LedgerError):
    pass


class RunBusy(LedgerError):
    def __init__(self, msg: str, *, owner: str) -> None:
        super().__init__(msg)
        self.owner = owner


CODE_TYPES = {
    "RATE_LIMITED": "rate_limited",
    "UPSTREAM_ERROR": "upstream_error",
    "INSUFFICIENT_CREDITS": "insufficient_credits",
    "SPEND_LIMIT_EXCEEDED": "spend_limit",
    "UNAUTHORIZED": "unauthorized",
    "NOT_FOUND": "not_found",
    "BAD_REQUEST": "bad_request",
    "VALIDATION_ERROR": "validation_error",
}


class ProviderError(RunnerError):
    def __init__(
        self,
        msg: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(msg)
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.kind = kind

    @property
    def error_type(self) -> str:
        """A stable name: the failure's kind (tls, timeout, …), else `http_<status>`, else the
        Run API's code in lower case; never the server's own free text."""
        if self.kind:
            return self.kind
        if self.status is not None:
            return f"http_{self.status}"
        return CODE_TYPES.get(self.code or "", "provider_error")


class RetryableError(ProviderError):
    pass


class RequestFatalError(ProviderError):
    pass


class RunFatalError(ProviderError):
    pass


class OutcomeUnknown(ProviderError):
    pass


def printable(text: str) -> str:
    """Text from a user's file, safe to print: control characters (and other unprintable ones)
    escaped, so a file cannot move the cursor or recolour the terminal."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
