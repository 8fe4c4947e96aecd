"""A judge's score read from its text as people write it: "0.8", "Score: 0.8.", "The answer is: 1.",
"**0.75**", "'0.9'", "85%", "4/5", "8 out of 10". The last score the text gives counts; a text that
gives none is a failed grade (its text kept), never a silent null."""

from __future__ import annotations

import re

# a fraction (4/5, 8 out of 10), a percentage (85%) or a plain number; a number may be followed by
# punctuation (a full stop ends many a judge's answer) but not by more of a number
_NUMBER = r"\d+(?:\.\d+)?|\.\d+"
CANDIDATE = re.compile(
    rf"(?<![\w.])(?:(?P<num>{_NUMBER})\s*(?:/|out\s+of)\s*(?P<den>{_NUMBER})"
    rf"|(?P<pct>{_NUMBER})\s*%|(?P<plain>{_NUMBER}))(?![\w%/]|\.\d)",
    re.IGNORECASE,
)
NO_SCORE = "no score from 0 to 1 (nor a percentage or fraction) in the judge's answer"


def judge_score(text: str | None) -> float | None:
    """The last score in [0, 1] the judge's text gives; None when it gives none."""
    found = None
    for match in CANDIDATE.finditer(text or ""):
        value = _value(match)
        if value is not None:
            found = value
    return found


def _value(match: re.Match[str]) -> float | None:
    if match["den"] is not None:
        numerator, denominator = float(match["num"]), float(match["den"])
        return numerator / denominator if denominator > 0 and 0 <= numerator <= denominator else None
    if match["pct"] is not None:
        percent = float(match["pct"])
        return percent / 100 if 0 <= percent <= 100 else None
    plain = float(match["plain"])
    return plain if 0 <= plain <= 1 else None
