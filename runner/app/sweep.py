"""Sweeps: a spec (dataset × prompt template × matrix of models and parameters × graders) read from
TOML, checked, and expanded into an ordinary job file.

Each line of the expanded job is one (dataset row × cell × repeat); its metadata carries the sweep's
coordinates (`sweep`: row id, cell key, repeat, the cell's parameters, the row's variables), and a
repeat above the first is marked as a sample (`metadata.sample`) so that the cache keeps each.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import math
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import jsonschema
import regex

from runner.app.stats import REDUCERS
from runner.core import catalog, codec, schema
from runner.core.catalog import ModelInfo
from runner.core.errors import ConfigError, SpecError, printable
from runner.core.jobs import not_regular

# a regex grader gets this long per answer (the regex module's timeout): a pattern that backtracks
# catastrophically fails that answer's grade instead of hanging the sweep, and `runner report`
REGEX_TIMEOUT_S = 1.0
MAX_SWEEP_REQUESTS = 5_000_000  # rows x cells x repeats: a job larger than this is a mistake in the spec
SPEC_KEYS = frozenset({"dataset", "id", "prompt", "matrix", "budget", "graders", "baseline"})
PROMPT_KEYS = frozenset({"system", "user", "messages"})
BUDGET_KEYS = frozenset({"per_cell_usd"})
GRADER_KINDS = ("exact", "contains", "regex", "json_valid", "json_schema", "judge")
GRADER_KEYS = {
    "exact": {"field", "ignore_case"},
    "contains": {"field", "value", "ignore_case"},
    "regex": {"pattern"},
    "json_valid": set(),
    "json_schema": {"schema"},
    "judge": {"model", "rubric", "max_tokens", "response_format"},
}
REDUCE_KEYS = {"reduce", "k"}  # any grader: how a row's repeats become one score (runner.app.stats)
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
ANSWER = "answer"  # the placeholder a judge's rubric reads the graded answer from


@dataclass(frozen=True)
class Grader:
    name: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def judge(self) -> bool:
        return self.kind == "judge"

    @property
    def reducer(self) -> str:
        return str(self.options.get("reduce", "mean"))

    @property
    def k(self) -> int:
        return int(self.options.get("k", 1))

    @property
    def passes(self) -> bool:
        """Whether its scores are pass/fail (a rule grader's), so that a row reduced by majority,
        max, at_least_k or a single sample passes or fails."""
        return not self.judge

    def score(self, content: str | None, row: dict[str, Any]) -> float | None:
        """1.0 / 0.0 for the rule graders (None when there is no answer); judges score elsewhere."""
        return self.grade(content, row)[0]

    def grade(self, content: str | None, row: dict[str, Any]) -> tuple[float | None, str | None]:
        """The score, and why there is none when grading failed (a regex that ran out of time)."""
        if self.kind == "regex" and content is not None:
            try:
                hit = regex.search(self.options["pattern"], content.strip(), timeout=REGEX_TIMEOUT_S)
            except TimeoutError:
                return None, f"the pattern took over {REGEX_TIMEOUT_S:g} s on this answer: not graded"
            return float(hit is not None), None
        return self._rule_score(content, row), None

    def _rule_score(self, content: str | None, row: dict[str, Any]) -> float | None:
        if content is None or self.judge:
            return None
        text, opts = content.strip(), self.options
        if self.kind in ("exact", "contains"):
            wanted = (
                str(opts["value"]) if "value" in opts else str(row.get(opts.get("field", "expected"), ""))
            )
            if opts.get("ignore_case"):
                text, wanted = text.casefold(), wanted.casefold()
            hit = text == wanted.strip() if self.kind == "exact" else wanted in text
            return float(hit)
        try:
            value = json.loads(text)
        except ValueError:
            return 0.0
        if self.kind == "json_valid":
            return 1.0
        return float(jsonschema.Draft202012Validator(opts["schema"]).is_valid(value))


@dataclass(frozen=True)
class Spec:
    path: Path
    dataset: Path
    id_field: str
    messages: list[dict[str, str]]  # role/content templates
    matrix: dict[str, list[Any]]  # request field -> values; `model` always there
    repeats: int
    per_cell_usd: Decimal | None
    graders: list[Grader]
    baseline: str | None = None  # the cell every other is compared with (else pairs differing in one field)
    # the models it may name: the catalog, and those a price file prices (what its job is validated with)
    models: dict[str, ModelInfo] = field(default_factory=lambda: catalog.MODELS)

    @property
    def params(self) -> list[str]:
        """The matrix's fields, model first: the cell's coordinates."""
        return ["model", *sorted(k for k in self.matrix if k != "model")]

    def cells(self) -> list[dict[str, Any]]:
        names = self.params
        return [
            dict(zip(names, values, strict=True))
            for values in itertools.product(*(self.matrix[n] for n in names))
        ]


def cell_key(cell: dict[str, Any]) -> str:
    """A cell's name: its parameters, as `model=…,temperature=…`."""
    return ",".join(f"{k}={codec.dumps_text(v) if not isinstance(v, str) else v}" for k, v in cell.items())


def _fail(spec: Path, key: str, message: str) -> SpecError:
    return SpecError(f"{spec}: {key}: {message}")


def load_spec(path: Path, models: dict[str, ModelInfo] | None = catalog.MODELS) -> Spec:
    """Read and check a spec: unknown keys, bad graders, an empty matrix and a model neither in
    `models` (the catalog, with a price file's) are errors naming the file and the key. `models`
    None: a spec read back for a report, whose models are not checked again."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    _unknown(path, "", raw, SPEC_KEYS)
    if not isinstance(raw.get("dataset"), str):
        raise _fail(path, "dataset", "the dataset file (JSONL or CSV) is required")
    dataset = (path.parent / raw["dataset"]).resolve()
    prompt = raw.get("prompt")
    if not isinstance(prompt, dict):
        raise _fail(path, "prompt", "a [prompt] table with `messages`, or `system` / `user`, is required")
    _unknown(path, "prompt.", prompt, PROMPT_KEYS)
    messages = _messages(path, prompt)
    matrix, repeats = _matrix(path, raw.get("matrix"), models)
    budget = raw.get("budget", {})
    if not isinstance(budget, dict):
        raise _fail(path, "budget", "must be a table")
    _unknown(path, "budget.", budget, BUDGET_KEYS)
    per_cell = _usd(path, "budget.per_cell_usd", budget["per_cell_usd"]) if "per_cell_usd" in budget else None
    graders = _graders(path, raw.get("graders", []), repeats, models)
    id_field = raw.get("id", "id")
    if not isinstance(id_field, str):
        raise _fail(path, "id", "must be the name of the dataset's id field")
    known = catalog.MODELS if models is None else models
    spec = Spec(path, dataset, id_field, messages, matrix, repeats, per_cell, graders, models=known)
    baseline = raw.get("baseline")
    return spec if baseline is None else with_baseline(spec, baseline, "baseline")


def with_baseline(spec: Spec, baseline: Any, where: str = "--baseline") -> Spec:
    """The spec with the cell every other is compared with (a cell of its matrix, by name)."""
    names = [cell_key(c) for c in spec.cells()]
    if baseline not in names:
        shown = ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
        msg = f"'{printable(str(baseline))}' is not a cell of the matrix ({shown})"
        if where.startswith("--"):  # the command line's, not the spec's
            raise ConfigError(f"{where}: {msg}")
        raise _fail(spec.path, where, msg)
    return dataclasses.replace(spec, baseline=str(baseline))


def _unknown(path: Path, prefix: str, table: dict[str, Any], known: frozenset[str] | set[str]) -> None:
    for key in table:
        if key not in known:
            raise _fail(path, f"{prefix}{printable(key)}", f"unknown key (known: {', '.join(sorted(known))})")


def _messages(path: Path, prompt: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in prompt:
        if "system" in prompt or "user" in prompt:
            raise _fail(path, "prompt", "give `messages`, or `system` / `user`, not both")
        messages = prompt["messages"]
        if not isinstance(messages, list) or not messages:
            raise _fail(path, "prompt.messages", "a non-empty list of {role, content} tables")
        for i, m in enumerate(messages):
            ok = isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in schema.ROLES
            if not ok or not isinstance(m["content"], str):
                raise _fail(
                    path, f"prompt.messages[{i}]", "needs `role` (system|user|assistant) and `content`"
                )
        return [dict(m) for m in messages]
    if not isinstance(prompt.get("user"), str):
        raise _fail(path, "prompt.user", "the user message template is required")
    system = prompt.get("system")
    if system is not None and not isinstance(system, str):
        raise _fail(path, "prompt.system", "must be a string")
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": prompt["user"]}]


def _matrix(path: Path, matrix: Any, models: dict[str, ModelInfo] | None) -> tuple[dict[str, list[Any]], int]:
    if not isinstance(matrix, dict) or not matrix.get("model"):
        raise _fail(path, "matrix.model", "the [matrix] needs at least one model")
    values: dict[str, list[Any]] = {}
    repeats = matrix.get("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise _fail(path, "matrix.repeats", "must be a whole number, 1 or more")
    for key, value in matrix.items():
        if key == "repeats":
            continue
        if key not in schema.FIELDS or key in ("messages", "stream", "n"):
            raise _fail(path, f"matrix.{printable(key)}", "not a request field a sweep can vary")
        listed = value if isinstance(value, list) else [value]
        if not listed:
            raise _fail(path, f"matrix.{printable(key)}", "an empty list: the matrix would have no cells")
        values[key] = listed
    for model in values["model"]:
        if not isinstance(model, str) or (models is not None and model not in models):
            raise _fail(path, "matrix.model", _unknown_model(model))
    cells = math.prod(len(v) for v in values.values())
    if cells * repeats > MAX_SWEEP_REQUESTS:  # counted, not built: nothing grows before this check
        msg = f"{cells:,} cells × {repeats:,} repeats = {cells * repeats:,} requests a dataset row"
        raise _fail(path, "matrix", f"{msg}, above the {MAX_SWEEP_REQUESTS:,} a sweep may expand to")
    return values, repeats


def _usd(path: Path, key: str, value: Any) -> Decimal:
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise _fail(path, key, f"'{printable(str(value))}' is not an amount in USD") from None
    if not amount > 0:
        raise _fail(path, key, "must be above 0")
    return amount


def _unknown_model(model: Any) -> str:
    return f"'{printable(str(model))}' is not a model of the catalog (nor of a price file: --price-file)"


def _graders(path: Path, items: Any, repeats: int, models: dict[str, ModelInfo] | None) -> list[Grader]:
    if not isinstance(items, list):
        raise _fail(path, "graders", "a list of [[graders]] tables")
    graders: list[Grader] = []
    for i, item in enumerate(items):
        where = f"graders[{i}]"
        kind = item.get("kind") if isinstance(item, dict) else None
        if kind not in GRADER_KINDS:
            raise _fail(
                path, f"{where}.kind", f"'{printable(str(kind))}' is not one of {', '.join(GRADER_KINDS)}"
            )
        options = {k: v for k, v in item.items() if k not in ("kind", "name")}
        _unknown(path, f"{where}.", options, GRADER_KEYS[kind] | REDUCE_KEYS)
        _check_reducer(path, where, options, repeats)
        name = item.get("name", kind)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise _fail(path, f"{where}.name", "letters, digits and _ only (it names a column)")
        if any(g.name == name for g in graders):
            raise _fail(path, f"{where}.name", f"'{name}' names two graders")
        _check_grader(path, where, kind, options, models)
        graders.append(Grader(name, kind, options))
    return graders


def _check_reducer(path: Path, where: str, options: dict[str, Any], repeats: int) -> None:
    reducer, k = options.get("reduce", "mean"), options.get("k", 1)
    if reducer not in REDUCERS:
        raise _fail(
            path, f"{where}.reduce", f"'{printable(str(reducer))}' is not one of {', '.join(REDUCERS)}"
        )
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= repeats:
        raise _fail(path, f"{where}.k", f"a whole number from 1 to the matrix's repeats ({repeats})")


def _check_grader(
    path: Path, where: str, kind: str, options: dict[str, Any], models: dict[str, ModelInfo] | None
) -> None:
    if kind == "regex":
        try:
            regex.compile(str(options.get("pattern", "")))
        except regex.error as exc:
            raise _fail(path, f"{where}.pattern", f"does not compile: {exc}") from None
        if "pattern" not in options:
            raise _fail(path, f"{where}.pattern", "required")
    if kind == "json_schema":
        given = options.get("schema")
        if not isinstance(given, dict):
            raise _fail(path, f"{where}.schema", "a JSON schema (a table) is required")
        try:
            jsonschema.Draft202012Validator.check_schema(given)
        except jsonschema.SchemaError as exc:
            raise _fail(path, f"{where}.schema", f"not a JSON schema: {exc.message}") from None
    if kind == "judge":
        if models is not None and options.get("model") not in models:
            raise _fail(path, f"{where}.model", _unknown_model(options.get("model")))
        if not isinstance(options.get("rubric"), str) or "{" + ANSWER + "}" not in options["rubric"]:
            raise _fail(path, f"{where}.rubric", "a template that names {answer} is required")


# ---- the dataset ----------------------------------------------------------------------------


def read_dataset(spec: Spec) -> Iterator[tuple[str, dict[str, Any]]]:
    """(row id, variables) for each row of the dataset, JSONL or CSV; an id repeated is an error."""
    seen: set[str] = set()
    for number, row in _rows(spec):
        if not isinstance(row, dict):
            raise SpecError(f"{spec.dataset}:{number}: a row must be an object")
        row_id = str(row.get(spec.id_field, number))
        if row_id in seen:
            raise SpecError(f"{spec.dataset}:{number}: {spec.id_field} '{printable(row_id)}' is used twice")
        seen.add(row_id)
        yield row_id, row


def _rows(spec: Spec) -> Iterator[tuple[int, Any]]:
    try:
        refused = not_regular(spec.dataset, "dataset")
        if refused:
            raise SpecError(f"{spec.path}: dataset: {spec.dataset}: {refused}")
        with spec.dataset.open(encoding="utf-8", newline="") as handle:
            if spec.dataset.suffix.lower() == ".csv":
                yield from _csv_rows(spec.dataset, handle)
                return
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        yield number, json.loads(line)
                    except ValueError as exc:
                        raise SpecError(f"{spec.dataset}:{number}: not valid JSON: {exc}") from None
    except OSError as exc:
        raise SpecError(f"{spec.path}: dataset: cannot read {spec.dataset}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{spec.path}: dataset: {spec.dataset} is not UTF-8 text") from None


def _csv_rows(path: Path, handle: Any) -> Iterator[tuple[int, dict[str, str]]]:
    """A CSV's rows as {header: field}, each row exactly as wide as the header: a missing or extra
    field, an unterminated quote or a NUL byte is an error naming the row's line (never a None sent
    as text)."""
    reader = csv.reader(handle, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return
        for fields in reader:
            line = reader.line_num
            if not fields:
                continue
            if len(fields) != len(header):
                msg = f"{path}:{line}: {len(fields)} fields where the header has {len(header)}"
                raise SpecError(msg)
            if any("\x00" in field for field in fields):
                raise SpecError(f"{path}:{line}: a NUL byte in a field")
            yield line, dict(zip(header, fields, strict=True))
    except csv.Error as exc:
        raise SpecError(f"{path}:{reader.line_num}: not valid CSV: {exc}") from None


def render(template: str, variables: dict[str, Any], where: str) -> str:
    """`{name}` filled from the row; a name the row does not have is an error naming it."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in variables:
            raise SpecError(f"{where}: the placeholder {{{name}}} has no variable in the row")
        return str(variables[name])

    return PLACEHOLDER.sub(fill, template)


# ---- expansion --------------------------------------------------------------------------------


@dataclass
class Expansion:
    job: Path
    cells: list[dict[str, Any]]
    rows: list[str]  # dataset row ids, in order
    requests: int


def expand(spec: Spec, folder: Path, keep_rows: set[str] | None = None) -> Expansion:
    """Write the job (one line per row × cell × repeat, rows outermost) into `folder`, named by the
    spec and a digest of its content: the same spec and data give the same file (and resume its run);
    a changed one is a new job whose unchanged requests the cache answers."""
    _check_size(spec, keep_rows)
    cells = spec.cells()
    for grader in spec.graders:  # a judge's rubric must fill from every row (the answer aside)
        if grader.judge:
            for row_id, variables in read_dataset(spec):
                where = f"{spec.path}: graders.{grader.name}.rubric, dataset row {printable(row_id)}"
                render(grader.options["rubric"], {**variables, ANSWER: ""}, where)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{spec.path.stem}.expanding"
    rows: list[str] = []
    count, digest = 0, hashlib.sha256()
    try:
        with partial.open("wb") as handle:  # streamed: a large sweep is not held in memory
            for row_id, variables in read_dataset(spec):
                if keep_rows is not None and row_id not in keep_rows:
                    continue
                rows.append(row_id)
                for line in _lines(spec, cells, row_id, variables):
                    digest.update(line)
                    handle.write(line)
                    count += 1
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    job = folder / f"{spec.path.stem}-{digest.hexdigest()[:12]}.jsonl"
    partial.replace(job)  # the same content under the same name: its run resumes
    return Expansion(job, cells, rows, count)


def _check_size(spec: Spec, keep_rows: set[str] | None) -> None:
    """rows × cells × repeats, counted (one streamed pass over the dataset) before the job is built."""
    rows = sum(1 for row_id, _ in read_dataset(spec) if keep_rows is None or row_id in keep_rows)
    cells = math.prod(len(v) for v in spec.matrix.values())
    total = rows * cells * spec.repeats
    if total > MAX_SWEEP_REQUESTS:
        msg = (
            f"{rows:,} rows × {cells:,} cells × {spec.repeats:,} repeats = {total:,} requests, above the "
            f"{MAX_SWEEP_REQUESTS:,} a sweep may expand to: use fewer rows, cells or repeats"
        )
        raise SpecError(f"{spec.path}: {msg}")


def _lines(
    spec: Spec, cells: list[dict[str, Any]], row_id: str, variables: dict[str, Any]
) -> Iterator[bytes]:
    """The job lines of one dataset row: a line per cell and repeat."""
    where = f"{spec.path}: prompt, dataset row {printable(row_id)}"
    messages = [{"role": m["role"], "content": render(m["content"], variables, where)} for m in spec.messages]
    for cell, repeat in itertools.product(cells, range(1, spec.repeats + 1)):
        key = cell_key(cell)
        coordinates = {
            "spec": str(spec.path.resolve()),  # `runner report` on the run finds its graders there
            "row": row_id,
            "cell": key,
            "repeat": repeat,
            "params": cell,
            "vars": variables,
        }
        meta: dict[str, Any] = {"sweep": coordinates}
        if spec.repeats > 1:
            meta["sample"] = repeat
        yield (
            codec.dumps(
                {"custom_id": f"{row_id}|{key}|{repeat}", **cell, "messages": messages, "metadata": meta}
            )
            + b"\n"
        )


def judge_line(grader: Grader, custom_id: str, answer: str, variables: dict[str, Any]) -> dict[str, Any]:
    """The judge's request for one answer: the rubric filled from the row and the answer."""
    prompt = render(grader.options["rubric"], {**variables, ANSWER: answer}, f"graders.{grader.name}")
    return {
        "custom_id": f"{grader.name}|{custom_id}",
        "model": grader.options["model"],
        "temperature": 0,
        "max_tokens": int(grader.options.get("max_tokens", 256)),
        "messages": [{"role": "user", "content": prompt}],
        "metadata": {"judge": grader.name, "graded": custom_id},
        # e.g. a JSON schema with a `score` from 0 to 1, which a server that constrains its output keeps to
        **(
            {"response_format": grader.options["response_format"]}
            if "response_format" in grader.options
            else {}
        ),
    }
