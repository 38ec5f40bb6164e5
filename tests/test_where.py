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


# ---------------------------------------------------------------------------------------------
# Limits and exactness (issue 15): one line and exit 2 (ConfigError), never a crash


BIG = pa.table({
    "grefine_seed": pa.array([2**53, 2**53 + 1, -2**63, 2**63 - 1, None], pa.int64()),
    "u": pa.array([0, 1, 2, 2**64 - 1, None], pa.uint64()),
    "tags": pa.array([["a"], ["b"], [], None, ["c"]]),
    "row_key": pa.array([1, 2, 3, 4, 5], pa.int64()),
})


def big_keys(expr: str) -> list[int]:
    return BIG.filter(parse_where(expr, BIG.schema)).column("row_key").to_pylist()


@pytest.mark.parametrize("expr, expected", [
    ("grefine_seed == 9007199254740992", [1]),  # 2^53: through float64 2^53 + 1 would equal it too
    ("grefine_seed == 9007199254740993", [2]),  # 2^53 + 1 is no float64
    ("grefine_seed != 9007199254740992", [2, 3, 4]),
    ("grefine_seed > 9007199254740992", [2, 4]),
    ("grefine_seed >= 9007199254740992.5", [2, 4]),
    ("grefine_seed < 9007199254740992.5", [1, 3]),
    ("grefine_seed == 9223372036854775807", [4]),
    ("grefine_seed == 1.5", []),
    ("grefine_seed != 1.5", [1, 2, 3, 4]),  # null stays out, as in every comparison
    ("grefine_seed > -1e30", [1, 2, 3, 4]),
    ("grefine_seed < -1e30", []),
    ("u >= 18446744073709551615", [4]),
    ("u < -1", []),
    ("u > 1e30", []),
    ("row_key < 2.5", [1, 2]),
    ("row_key <= -0.5 or row_key > 4.0", [5]),
    ("tags == null", [4]),  # a list column can still be tested for null
])
def test_integer_columns_compare_exactly(expr, expected):
    assert big_keys(expr) == expected


def one_line_error(expr: str, schema=BIG.schema) -> str:
    with pytest.raises(ConfigError) as e:
        parse_where(expr, schema)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_deep_nesting_is_one_line_not_a_recursion_error():
    for depth in (101, 330, 400, 5000):
        assert "nested more than 100 deep" in one_line_error("(" * depth + "row_key == 1" + ")" * depth)
        assert "nested more than 100 deep" in one_line_error("not " * depth + "row_key == 1")
    assert big_keys("(" * 100 + "row_key == 1" + ")" * 100) == [1]


def test_long_chains_are_refused_before_arrow_crashes_on_them():
    assert big_keys(" or ".join(["row_key == 1"] * 1000)) == [1]
    assert "more than 1000 comparisons" in one_line_error(" or ".join(["row_key == 1"] * 20000))


def test_empty_where_and_list_columns_and_huge_literals_are_refused():
    for expr in ("", "   ", None):
        assert "--where is empty" in one_line_error(expr)
    msg = one_line_error("tags == 'a'")
    assert "'tags' holds list<item: string>, which --where cannot compare" in msg
    assert "columns: grefine_seed, u, row_key" in msg
    assert "out of range" in one_line_error("grefine_seed == 1e999999999")  # no billion-digit integer
