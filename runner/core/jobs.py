"""Job files: JSONL streamed line by line into validated ChatRequests.

Three line shapes are accepted:
  - a chat-completions body `{"model", "messages", ...}` with optional `custom_id` / `metadata`;
  - an OpenAI Batch line `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}`;
  - a Run API envelope `{"api", "path": "/v1/chat/completions", "body"}` with optional
    `custom_id` / `metadata`.
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from runner.core import catalog, codec, schema
from runner.core.catalog import ModelInfo
from runner.core.config import MAX_LINE_BYTES
from runner.core.errors import Issue, JobError, printable
from runner.core.models import ChatRequest

CHAT_PATH = "/v1/chat/completions"
BATCH_KEYS = frozenset({"custom_id", "method", "url", "body", "metadata"})
ENVELOPE_KEYS = frozenset({"api", "path", "body", "custom_id", "metadata"})
ISSUES_KEPT = 1000  # a summary keeps this many issues; the count covers them all
MAX_DEPTH = 64  # JSON nested deeper than this is refused (a chat request needs a handful of levels)

LineResult = ChatRequest | list[Issue]


def body_sha256(body: dict[str, Any]) -> str:
    return hashlib.sha256(codec.canonical(body)).hexdigest()


def _unwrap(obj: dict[str, Any]) -> tuple[Any, Any, Any, list[tuple[str, str]]]:
    """(body, custom_id, metadata, problems) for any of the three line shapes."""
    problems: list[tuple[str, str]] = []
    if "url" in obj or "method" in obj:
        problems += [(k, "unknown field in an OpenAI Batch line") for k in obj.keys() - BATCH_KEYS]
        if obj.get("method") != "POST":
            problems.append(("method", f"{obj.get('method')!r} is not POST"))
        if obj.get("url") != CHAT_PATH:
            problems.append(("url", f"{obj.get('url')!r} is not {CHAT_PATH}"))
        if "custom_id" not in obj:
            problems.append(("custom_id", "is required in an OpenAI Batch line"))
        return obj.get("body"), obj.get("custom_id"), obj.get("metadata"), problems
    if "api" in obj or "path" in obj:
        problems += [(k, "unknown field in a Run API envelope") for k in obj.keys() - ENVELOPE_KEYS]
        if not isinstance(obj.get("api"), str):
            problems.append(("api", "the api slug (e.g. 'baseten') is required"))
        if obj.get("path") != CHAT_PATH:
            problems.append(("path", f"{obj.get('path')!r} is not {CHAT_PATH}"))
        return obj.get("body"), obj.get("custom_id"), obj.get("metadata"), problems
    body = {k: v for k, v in obj.items() if k not in ("custom_id", "metadata")}
    return body, obj.get("custom_id"), obj.get("metadata"), problems


def _key_written_twice(raw: bytes, obj: dict[str, Any]) -> str | None:
    """A key an object of the line gives twice (a JSON parser keeps the last value silently); None
    when none does. Each key is written as a string and a colon, so a line holding no more `":` than
    its objects written back by the codec (each key one, a quote inside a string escaped as there)
    gives no key twice, unless it spaces a key from its colon or escapes a quote otherwise: only
    those lines are read again, keeping every pair."""
    unusual = b'" :' in raw or b'"\t:' in raw or b'"\r:' in raw or b'"\n:' in raw or b"\\u0022" in raw
    if not unusual and raw.count(b'":') <= codec.dumps(obj).count(b'":'):
        return None
    found: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in items]
        if not found and len(set(keys)) < len(keys):
            found.append(next(k for i, k in enumerate(keys) if k in keys[:i]))
        return dict(items)

    try:
        json.loads(raw, object_pairs_hook=pairs)
    except ValueError:  # a line only the slow reader takes (a byte order mark): left as it is read
        return None
    return found[0] if found else None


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` levels (checked without recursion)."""
    level: list[Any] = [value]
    for _ in range(limit):
        level = [
            inner
            for outer in level
            for inner in (outer.values() if isinstance(outer, dict) else outer)
            if isinstance(inner, dict | list)
        ]
        if not level:
            return False
    return True


def lines_of(handle: Any, limit: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """(number, raw line) of a file opened in binary mode, each read with a bound: a line longer
    than `limit` bytes comes as None, and nothing after it is read (a file with no line ends, such
    as /dev/zero, is not read into memory)."""
    number = 0
    while raw := handle.readline(limit + 1):
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            yield number, None
            return
        yield number, raw


def too_long(file: str, line: int, limit: int) -> list[Issue]:
    message = f"longer than {limit:,} bytes (--max-line-bytes): the file was not read past it"
    return [Issue(file, line, "", message)]


def parse_line(
    raw: bytes,
    *,
    file: str,
    line: int,
    models: dict[str, ModelInfo],
    check: bool = True,
    hashed: bool = True,
) -> LineResult | None:
    """One raw line → a ChatRequest, its issues, or None for a blank line.

    `check=False` skips the request contract (for a line already validated, whose hash is compared);
    `hashed=False` leaves the body's hash out (empty), for a reader that has no use for it.
    """

    def issue(where: str, message: str) -> list[Issue]:
        return [Issue(file, line, where, message)]

    obj = codec.quick_loads(raw)  # most lines: the rest of this block is for those it leaves
    if obj is codec.UNREAD:
        obj = _slow_read(raw, first=line == 1)
        if obj is None:
            return None
        if isinstance(obj, _Unreadable):
            return issue("", obj.reason)
    if not isinstance(obj, dict):
        return issue("", f"a line must be a JSON object, not {type(obj).__name__}")
    # a line with no more than MAX_DEPTH opening brackets cannot nest deeper (most lines: no walk)
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and _deeper_than(obj, MAX_DEPTH):
        return issue("", f"JSON nested more than {MAX_DEPTH} levels deep")
    twice = _key_written_twice(raw, obj)
    if twice is not None:
        return issue(printable(twice), "given twice in the line: which value was meant is not known")
    body, custom_id, metadata, shape_problems = _unwrap(obj)
    problems = list(shape_problems)
    if not isinstance(body, dict):
        problems.append(("body", "a request body object is required"))
    elif check:
        problems += schema.check_body(body, models)
    if custom_id is not None and (not isinstance(custom_id, str) or not custom_id):
        problems.append(("custom_id", "must be a non-empty string"))
    if metadata is not None and not isinstance(metadata, dict):
        problems.append(("metadata", "must be an object"))
    if problems:
        return [Issue(file, line, where, message) for where, message in problems]
    assert isinstance(body, dict)
    return ChatRequest(
        file=file,
        line=line,
        custom_id=custom_id if custom_id is not None else str(line),
        body=body,
        metadata=metadata or {},
        sha256=body_sha256(body) if hashed else "",
    )


@dataclass(frozen=True)
class _Unreadable:
    reason: str


def _slow_read(raw: bytes, *, first: bool) -> Any:
    """A line the fast reader left: its JSON, None for a blank line, or why it cannot be read."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _Unreadable(f"not valid UTF-8 (byte {exc.start} of the line)")
    if first and text.startswith("\ufeff"):
        text = text[1:]
    text = text.strip()
    if not text:
        return None
    try:
        obj = codec.loads_exact(text)
    except json.JSONDecodeError as exc:
        return _Unreadable(f"not valid JSON: {exc.msg} at column {exc.colno}")
    except RecursionError:
        return _Unreadable(f"JSON nested more than {MAX_DEPTH} levels deep")
    try:  # what orjson refused and the standard library read may hold a lone surrogate
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start : exc.end].encode("unicode_escape").decode("ascii")
        return _Unreadable(f"a lone surrogate ({bad}) is not text: not valid Unicode")
    except RecursionError:
        return _Unreadable(f"JSON nested more than {MAX_DEPTH} levels deep")
    return obj


def read_job(
    path: str | Path,
    models: dict[str, ModelInfo] | None = None,
    *,
    check: bool = True,
    digest: Any = None,
    hashed: bool = True,
    max_line: int = MAX_LINE_BYTES,
) -> Iterator[LineResult]:
    """Stream a job file: every non-blank line as a ChatRequest or its issues, in file order.

    An empty file is reported as an issue; duplicate custom_ids are found by `validate_job`, which
    sees the whole file. `digest` (a hashlib object) is fed every line read.
    """
    file = str(path)
    known = models if models is not None else catalog.MODELS
    try:
        not_a_file = not_regular(path, "job")
        handle = None if not_a_file else Path(path).open("rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        yield [Issue(file, 0, "", f"cannot read the job file: {exc.strerror}")]
        return
    if handle is None:
        yield [Issue(file, 0, "", str(not_a_file))]
        return
    with handle:
        count = 0
        for number, raw in lines_of(handle, max_line):
            if raw is None:
                yield too_long(file, number, max_line)
                return
            if digest is not None:
                digest.update(raw)
            result = parse_line(raw, file=file, line=number, models=known, check=check, hashed=hashed)
            if result is None:
                continue
            count += 1
            yield result
    if count == 0:
        yield [Issue(file, 0, "", "the job has no requests (the file is empty)")]


class _Ids:
    """Every custom_id with its line, kept as compact polars columns (a Python set of a million ids
    costs ~70 MB, these ~20 MB), to find the ones used twice once the whole file is read."""

    CHUNK = 65_536

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._lines: list[int] = []
        self._parts: list[pl.DataFrame] = []

    def add(self, custom_id: str, line: int) -> None:
        self._ids.append(custom_id)
        self._lines.append(line)
        if len(self._ids) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._ids:
            self._parts.append(pl.DataFrame({"id": self._ids, "line": self._lines}, schema=_ID_SCHEMA))
            self._ids, self._lines = [], []

    def duplicates(self, file: str) -> Iterator[Issue]:
        """Each later use of an id, naming the line that used it first, in line order."""
        self._flush()
        if not self._parts:
            return
        ids = pl.concat(self._parts, rechunk=False)
        self._parts = []
        # a sorted column of 64-bit hashes says cheaply whether any id may repeat (polars' hash-based
        # duplicate search over a million strings costs ~100 MB); only then are the strings compared
        hashes = ids["id"].hash().sort()
        if not (hashes == hashes.shift(1)).any():
            return
        twice = ids.filter(pl.col("id").is_duplicated())
        later = (
            twice.with_columns(first=pl.col("line").min().over("id"))
            .filter(pl.col("line") != pl.col("first"))
            .sort("line")
        )
        for custom_id, line, first in later.iter_rows():
            yield Issue(file, line, "custom_id", f"'{custom_id}' is used by an earlier line ({first})")


_ID_SCHEMA = {"id": pl.String, "line": pl.Int64}


@dataclass
class JobSummary:
    """What validation found in one job file."""

    file: str
    per_model: Counter[str] = field(default_factory=Counter)
    issues: list[Issue] = field(default_factory=list)
    issue_count: int = 0
    digest: str = ""  # of the file's bytes as validated (`file_digest`): a later read compares it

    @property
    def requests(self) -> int:
        return sum(self.per_model.values())

    @property
    def ok(self) -> bool:
        return self.issue_count == 0

    def raise_for_issues(self) -> None:
        if not self.ok:
            msg = f"{self.file}: {self.issue_count} problem(s) found"
            raise JobError(msg, issues=self.issues, total=self.issue_count)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON, for a summary made in another process (`from_json` reads it back)."""
        issues = [[i.file, i.line, i.field, i.message] for i in self.issues]
        return {
            "file": self.file,
            "per_model": dict(self.per_model),
            "issues": issues,
            "issue_count": self.issue_count,
            "digest": self.digest,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobSummary:
        return cls(
            file=str(data["file"]),
            per_model=Counter({str(k): int(v) for k, v in data["per_model"].items()}),
            issues=[Issue(str(f), int(n), str(w), str(m)) for f, n, w, m in data["issues"]],
            issue_count=int(data["issue_count"]),
            digest=str(data["digest"]),
        )


def not_regular(path: str | Path, what: str) -> str | None:
    """Why `path` cannot be read as a `what` file, when it is not a regular one: a pipe nobody writes
    (or a device) would block forever, and runner reads a job more than once (to validate, then to
    send); None for a regular file. An OSError (a missing file) is left to the caller's open."""
    mode = Path(path).stat().st_mode
    if stat.S_ISREG(mode):
        return None
    kind = "a folder" if stat.S_ISDIR(mode) else "a pipe" if stat.S_ISFIFO(mode) else "not a regular file"
    return f"the {what} file is {kind}: give a regular file (runner reads it more than once)"


def validate_job(
    path: str | Path, models: dict[str, ModelInfo] | None = None, max_line: int = MAX_LINE_BYTES
) -> JobSummary:
    """Validate a whole job file in one streamed pass, collecting every issue (in line order)."""
    summary = JobSummary(file=str(path))
    ids = _Ids()
    digest = file_digest()

    def note(issues: Iterable[Issue]) -> None:
        for issue in issues:
            summary.issue_count += 1
            if len(summary.issues) < ISSUES_KEPT:
                summary.issues.append(issue)

    for result in read_job(path, models, digest=digest, hashed=False, max_line=max_line):
        if isinstance(result, ChatRequest):
            summary.per_model[result.model] += 1
            ids.add(result.custom_id, result.line)
        else:
            note(result)
    note(ids.duplicates(summary.file))
    summary.digest = digest.hexdigest()
    summary.issues.sort(key=lambda issue: issue.line)
    return summary


class JobChunks:
    """A validated job read in chunks of `size` physical lines, numbered from 0 and taken in rising
    order; a chunk passed over is read past without parsing.

    The lines are not checked against the contract again: each one's hash is compared with the hash
    recorded when it was validated. A line that no longer parses raises JobError.
    """

    def __init__(self, path: str | Path, size: int, max_line: int = MAX_LINE_BYTES) -> None:
        self.file, self.size, self.max_line = str(path), size, max_line
        self._handle = Path(path).open("rb")  # noqa: SIM115 - closed by close()
        self._next = 1  # the number of the line the handle reads next

    def take(self, index: int) -> list[ChatRequest] | None:
        """The requests of chunk `index` (blank lines have none); None past the end of the file."""
        first = index * self.size + 1
        if first < self._next:
            msg = f"chunk {index} was passed already"
            raise ValueError(msg)
        readline = self._handle.readline
        while self._next < first:
            if not readline(self.max_line + 1):
                return None
            self._next += 1
        chunk: list[ChatRequest] = []
        for number in range(first, first + self.size):
            raw = readline(self.max_line + 1)
            if not raw:
                return chunk if number > first else None
            self._next += 1
            if len(raw) > self.max_line and not raw.endswith(b"\n"):
                raise _changed_while_read(self.file, too_long(self.file, number, self.max_line))
            result = parse_line(raw, file=self.file, line=number, models=catalog.MODELS, check=False)
            if isinstance(result, ChatRequest):
                chunk.append(result)
            elif result is not None:
                raise _changed_while_read(self.file, result)
        return chunk

    def close(self) -> None:
        self._handle.close()


def _changed_while_read(file: str, issues: list[Issue]) -> JobError:
    """A line of a validated job that no longer parses: the file was edited since."""
    return JobError(f"{file}: the job changed while it was being read", issues=issues, total=len(issues))


def file_digest() -> Any:
    return hashlib.blake2b(digest_size=16)


def count_lines(path: str | Path) -> int:
    """The file's lines (blank ones included), counted without parsing them: a progress total for a
    job whose validation is still under way. 0 when the file cannot be read (validation says why)."""
    count = 0
    try:
        with Path(path).open("rb") as handle:
            last = b"\n"
            while block := handle.read(1 << 20):
                count += block.count(b"\n")
                last = block[-1:]
    except OSError:
        return 0
    return count + (last != b"\n")


def iter_requests(
    path: str | Path,
    models: dict[str, ModelInfo] | None = None,
    *,
    check: bool = True,
    digest: Any = None,
    max_line: int = MAX_LINE_BYTES,
) -> Iterator[ChatRequest]:
    """Stream the requests of a job already validated; any issue met raises JobError.

    `check=False` skips the request contract on each line: for a caller that compares each line's
    hash with the hash recorded when the line was validated. Duplicate custom_ids are not looked
    for here (`validate_job` does): a caller that makes or runs rows guards against them itself.
    """
    for result in read_job(path, models, check=check, digest=digest, max_line=max_line):
        if not isinstance(result, ChatRequest):
            raise _changed_while_read(str(path), result)
        yield result
