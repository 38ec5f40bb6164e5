"""--where: the small filter language of `export` (parsed, never eval'd)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from grefine_curate.curate.errors import ConfigError
from grefine_curate.pipelines.where import columns_of, parse_where

T = pa.table({
    "pq_score_after": pa.array([0.1, 0.7, None, 0.9], pa.float32()),
    "aq_score": pa.array([0.5, None, 0.3, 0.9], pa.float32()),
    "grefine_route": ["full", "skip", "light", "reverted"],
    "row_key": pa.array([1, 2, 3, 4], pa.int64()),
})


def keys(expr: str) -> list[int]:
    return T.filter(parse_where(expr, T.schema)).column("row_key").to_pylist()


@pytest.mark.parametrize("expr, expected", [
    ("pq_score_after >= 0.6", [2, 4]),
    ("pq_score_after < 0.5", [1]),  # null compares false
    ("aq_score == null", [2]),
    ("aq_score != null and aq_score > .4", [1, 4]),
    ("grefine_route == 'full' or grefine_route = \"light\"", [1, 3]),
    ("not grefine_route != 'skip'", [2]),
    ("row_key > 1 and row_key < 4 or row_key == 1", [1, 2, 3]),  # and binds tighter than or
    ("row_key > 1 and (row_key < 4 or row_key == 1)", [2, 3]),
    ("row_key >= 1e0 AND row_key <= 2", [1, 2]),  # keywords in any case
])
def test_expressions(expr, expected):
    assert keys(expr) == expected


@pytest.mark.parametrize("expr, message", [
    ("", "empty"),
    ("pq_score >= 0.6", "no column 'pq_score'; columns: pq_score_after"),
    ("grefine_route >= 1", "holds string, not numbers"),
    ("row_key == 'a'", "not text"),
    ("grefine_route < 'a'", "text compares only with == or !="),
    ("aq_score < null", "null compares only"),
    ("(row_key > 1", "missing ')'"),
    ("row_key > 1 row_key", "unexpected 'row_key'"),
    ("__import__('os').system('x')", "unexpected character"),  # rejected before any name is looked up
    ("__import__ == 1", "no column '__import__'"),
    ("row_key > 1; drop", "unexpected character"),
])
def test_errors_name_the_problem(expr, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_where(expr, T.schema)


def test_columns_of():
    assert columns_of("a >= 1 and (b == null or not c != 'x')") == {"a", "b", "c"}
