"""Answers and quotes kept for reuse: dry-run quotes, answers bought before (the cache), and the
copies that stand for an identical line."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from runner.core.models import Quote
from runner.core.result import copied_names
from runner.ledger.base import (
    LedgerBase,
    stored_quote,
)
from runner.ledger.db import time_text


class AnswerOps(LedgerBase):
    def cached_quotes(self, keys: Sequence[str], *, since: datetime | None = None) -> dict[str, Quote]:
        """The kept quotes of `keys`; with `since`, only those asked at or after it."""
        found: dict[str, Quote] = {}
        young = "" if since is None else "at >= ? AND "
        sql = f"SELECT key, amount_nanos, exact, source, reason FROM quotes WHERE {young}key IN ({{}})"  # noqa: S608
        params = () if since is None else (time_text(since),)
        for key, amount, exact, source, reason in self._select_in(sql, keys, *params):
            found[key] = stored_quote(amount, bool(exact), source, reason)
        return found

    def reusable_answers(self, scope: str, keys: Sequence[str]) -> dict[str, tuple[int, int]]:
        """{answer key: (row id, what it cost)} of answers kept from runs on this provider endpoint
        (the newest for each key); copies are not sources, their originals are."""
        sql = (
            "SELECT r.answer_key, r.id, coalesce(r.price_nanos, 0) FROM requests r"
            " JOIN runs ON runs.id = r.run_id WHERE runs.provider = ? AND r.state = 'ok'"
            " AND r.cached_from IS NULL AND r.answer_key IN ({}) ORDER BY r.id"
        )
        return {key: (int(row_id), int(price)) for key, row_id, price in self._select_in(sql, keys, scope)}

    def fill_copies(self, run_id: str) -> int:
        """Give the run's copies their answers: a copy of an earlier run's answer at once, a copy of
        an identical line once that line is answered (ok or failed). Copies cost nothing; returns
        how many were filled."""
        # the answer's result fields (runner.core.result), and its error where it failed
        copied = ", ".join(f"{f} = src.{f}" for f in [*copied_names(), "error_type", "error_message"])
        with self.transaction() as tx:
            # an identical line of the same run: the first of them that is not a copy is the source
            tx.conn.execute(
                "UPDATE requests SET cached_from = (SELECT min(o.id) FROM requests o"
                " WHERE o.run_id = requests.run_id AND o.answer_key = requests.answer_key"
                " AND o.state != 'copy') WHERE run_id = ? AND state = 'copy' AND cached_from IS NULL",
                (run_id,),
            )
            done = tx.conn.execute(
                f"UPDATE requests SET {copied}, state = src.state, price_nanos = 0, finished_at = ?"  # noqa: S608
                " FROM requests AS src WHERE requests.run_id = ? AND requests.state = 'copy'"
                " AND src.id = requests.cached_from AND src.state IN ('ok', 'failed')",
                (tx.now, run_id),
            ).rowcount
        return int(done)

    def source_prices(self, run_id: str) -> dict[str, int]:
        """{custom_id: what the answer cost when it was bought} for the run's requests answered from
        the ledger."""
        with self.db.reading() as c:
            rows = c.execute(
                "SELECT r.custom_id, coalesce(src.price_nanos, 0) FROM requests r"
                " JOIN requests src ON src.id = r.cached_from WHERE r.run_id = ?",
                (run_id,),
            ).fetchall()
        return {str(custom_id): int(price) for custom_id, price in rows}

    def reused(self, run_id: str) -> tuple[int, int]:
        """(requests of the run answered from the ledger, what their answers cost when bought)."""
        with self.db.reading() as c:
            count, saved = c.execute(
                "SELECT count(*), coalesce(sum(src.price_nanos), 0) FROM requests r"
                " JOIN requests src ON src.id = r.cached_from WHERE r.run_id = ? AND r.state != 'copy'",
                (run_id,),
            ).fetchone()
        return int(count), int(saved)

    def store_quotes(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        with self.transaction() as tx:
            tx.conn.executemany(
                "INSERT INTO quotes (key, amount_nanos, exact, source, reason, at) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET amount_nanos = excluded.amount_nanos,"
                " exact = excluded.exact, source = excluded.source, reason = excluded.reason,"
                " at = excluded.at",
                [(r["key"], r["amount_nanos"], r["exact"], r["source"], r["reason"], tx.now) for r in rows],
            )

    def completion_shares(self, scope: str) -> dict[str, float]:
        """Per model, the mean share of its answers' bound (completion tokens ÷ the most they could
        have been) in the answers bought in this provider endpoint's 20 newest runs (a read bounded
        whatever the ledger holds: every run and estimate makes it)."""
        sql = (
            "SELECT model, avg(CAST(completion_tokens AS REAL) / output_bound) FROM requests"
            " WHERE run_id IN (SELECT id FROM runs WHERE provider = ? ORDER BY created_at DESC LIMIT 20)"
            " AND state = 'ok' AND output_bound > 0 AND completion_tokens IS NOT NULL"
            " AND cached_from IS NULL GROUP BY model"
        )
        with self.db.reading() as c:
            return {str(m): min(1.0, float(v)) for m, v in c.execute(sql, (scope,)) if v is not None}
