"""A judge's score read as people write it, from a table of real-looking answers."""

from __future__ import annotations

import pytest

from runner.app.scores import judge_score

ANSWERS = [
    ("0.8", 0.8),
    ("Score: 0.8.", 0.8),
    ("The answer is: 1.", 1.0),
    ("The answer is correct. Score: 1", 1.0),
    ("**0.75**", 0.75),
    ("Final score: **1.0**.", 1.0),
    ("'0.9'", 0.9),
    ('"0.25"', 0.25),
    ("I give it 85%.", 0.85),
    ("Rating: 4/5", 0.8),
    ("8 out of 10.", 0.8),
    ("Score = .5", 0.5),
    ("The capital is Paris (2 points in the rubric), so the score is 0.", 0.0),
    ("Question 3 asks for the capital. It is right: score 1.0\n", 1.0),
    ("Score: 0.6\n\nExplanation: partly right.", 0.6),
    ("0", 0.0),
]
NONE = [
    "",
    "The answer is correct.",
    "Score: 7",  # out of range, and no scale given
    "Version 1.2.3 is out.",
    "150%",
]


@pytest.mark.parametrize(("text", "score"), ANSWERS)
def test_a_score_written_as_people_write_it_is_read(text: str, score: float) -> None:
    assert judge_score(text) == pytest.approx(score)


@pytest.mark.parametrize("text", NONE)
def test_a_text_with_no_score_gives_none(text: str) -> None:
    assert judge_score(text) is None
