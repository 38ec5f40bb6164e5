"""The curator's path through routing: planned routes in score mode, quantile thresholds
(--refine-worst / --light-next), and reusing an audit (--scores) without scoring again."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from grefine_curate.curate.config import RoutingConfig
from grefine_curate.curate.errors import ConfigError, InputError
from grefine_curate.curate.routing import choose_route
from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines import executors
from grefine_curate.pipelines.job import JobConfig, run_job
from grefine_curate.pipelines.thresholds import QuantileRouting, quantile_routing, threshold_at
from job_corpus import FakeEngine, write_dataset, write_folder, write_shard

TINY = RoutingConfig(skip_p=0.0, skip_a=0.6, light_p=0.0, light_a=0.3)  # configs/tiny.toml [routing]


def job(tmp_path, out, **kw) -> JobConfig:
    kw.setdefault("preset", "tiny")
    kw.setdefault("executor", "local")
    kw.setdefault("batch_size", 3)
    kw.setdefault("quiet", True)
    inputs = kw.pop("inputs", [tmp_path / "in"])
    return JobConfig(inputs=[str(i) for i in inputs], out=str(tmp_path / out), **kw)


def ok(summary):
    assert summary.exit_code == 0, summary.lines()
    return summary


def rows(tmp_path, out) -> dict[str, list]:
    t = pq.ParquetDataset(str(tmp_path / out)).read()  # every output shard (state dir skipped)
    return t.to_pydict()


def manifest(tmp_path, out) -> dict:
    return json.loads((tmp_path / out / "__grefine__" / "manifest.json").read_text())


@pytest.fixture
def fake_engine(monkeypatch):
    eng = FakeEngine()
    monkeypatch.setattr(executors, "cached_engine", lambda spec: eng)
    return eng


# ---------------------------------------------------------------------------------------------
# Thresholds from fractions


def test_threshold_at_puts_the_worst_fraction_strictly_below():
    v = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.05])
    for f, below in [(0.0, 0), (0.1, 1), (0.15, 2), (0.2, 2), (0.5, 5), (1.0, 10)]:
        assert int((v < threshold_at(v, f)).sum()) == below, f
    ties = np.array([0.2, 0.2, 0.2, 0.9])
    assert int((ties < threshold_at(ties, 0.5)).sum()) == 0  # ties take the better route: at most F
    assert threshold_at(np.array([]), 0.3) == 0.0


def test_quantile_routing_is_one_budget_over_p_and_a_and_without_prompts():
    p = np.linspace(0.0, 0.99, 100)
    a = np.linspace(0.99, 0.0, 100)  # the worst by p are the best by a: two disjoint worst sets
    r = quantile_routing(p, a, QuantileRouting(0.1, 0.2))
    full = (p < r.light_p) | (a < r.light_a)
    assert full.sum() == 10 and (p < r.light_p).sum() == 5 and (a < r.light_a).sum() == 5  # 10 in all, not 10 + 10
    assert ((p < r.skip_p) | (a < r.skip_a)).sum() == 30
    r = quantile_routing(p, np.array([]), QuantileRouting(0.1, 0.0))
    assert r.light_a == r.skip_a == 0.0 and r.light_p == r.skip_p and (p < r.light_p).sum() == 10
    with pytest.raises(ConfigError, match="at most 1"):
        quantile_routing(p, a, QuantileRouting(0.7, 0.4))
    with pytest.raises(ConfigError, match="--refine-worst must be a fraction"):
        quantile_routing(p, a, QuantileRouting(15, 0.0))


# ---------------------------------------------------------------------------------------------
# Score mode: planned routes


def test_score_mode_writes_the_planned_route(tmp_path, fake_engine):
    write_dataset(str(tmp_path / "in"), shards=2, rows=4)
    s = ok(run_job(job(tmp_path, "audit", mode="score")))
    r = rows(tmp_path, "audit")
    assert r[C.ROUTE_PLANNED] == [True] * 8
    assert r[C.ROUTE] == [choose_route(p, a, TINY) for p, a in zip(r[C.PQ_SCORE], r[C.AQ_SCORE])]
    assert sum(s.routes.values()) == 8 and "planned routes" in s.lines()[1]
    m = manifest(tmp_path, "audit")
    assert m["routing"]["planned"] is True and m["routing"]["thresholds"]["skip_a"] == 0.6
    assert m["counts"]["routes"] == s.routes


def test_score_with_a_budget_plans_routes_with_its_thresholds(tmp_path, fake_engine):
    """`score --refine-worst F --light-next G`: the planned routes are the budget's (issue 16)."""
    write_dataset(str(tmp_path / "in"), shards=2, rows=10)
    s = ok(run_job(job(tmp_path, "o", mode="score", refine_worst=0.2, light_next=0.3)))
    assert sum(fake_engine.batches) == 20  # scored once (the audit pass); the planned run reuses its scores
    man = manifest(tmp_path, "o")
    assert man["routing"]["planned"] is True and man["routing"]["source"] == "quantiles"
    t = RoutingConfig(**{k: man["routing"]["thresholds"][k] for k in ("skip_p", "skip_a", "light_p", "light_a")})
    out = rows(tmp_path, "o")
    assert out[C.ROUTE] == [choose_route(p, a, t) for p, a in zip(out[C.PQ_SCORE], out[C.AQ_SCORE])]
    real = man["routing"]["realised"]
    assert out[C.ROUTE].count("full") == real["full"] <= 4 and out[C.ROUTE].count("light") == real["light"] <= 6
    assert any("budget" in n for n in s.notes)
    with pytest.raises(ConfigError, match="--scores in a score run"):
        run_job(job(tmp_path, "x", mode="score", scores=str(tmp_path / "o")))


def test_a_score_run_with_a_budget_plans_with_its_thresholds(tmp_path, fake_engine):
    """plans_routing says a score run with a budget plans, plan_routing scores into OUT/__grefine__/audit
    (outputs named *.scores) and gives the budget's thresholds."""
    from grefine_curate.curate.config import resolve_preset
    import dataclasses

    from grefine_curate.pipelines.routing_plan import check_plan_options, plan_routing, plans_routing, score_pass
    from grefine_curate.pipelines.sources import ColumnSpec, discover

    write_dataset(str(tmp_path / "in"), shards=2, rows=10)
    cfg = job(tmp_path, "plan", mode="score", refine_worst=0.2, light_next=0.3)
    assert plans_routing(cfg) and not plans_routing(job(tmp_path, "x", mode="score"))
    assert plans_routing(job(tmp_path, "x", scores="A")) and not plans_routing(job(tmp_path, "x"))
    check_plan_options(cfg)
    with pytest.raises(ConfigError, match="--scores in a score run"):
        check_plan_options(job(tmp_path, "x", mode="score", scores="A"))
    with pytest.raises(ConfigError, match="--light-next must be a fraction"):
        check_plan_options(job(tmp_path, "x", mode="score", light_next=2.0))
    shards = discover(cfg.inputs, ColumnSpec(), out=cfg.out)
    audit_uri, stopped = score_pass(cfg, run=run_job)
    assert stopped is None
    plan = plan_routing(dataclasses.replace(cfg, scores=audit_uri), resolve_preset("tiny"), shards, [None] * len(shards))
    assert plan.info["source"] == "quantiles"
    import glob

    audit = pq.ParquetDataset(sorted(glob.glob(str(tmp_path / "plan/__grefine__/audit/**/*.scores"), recursive=True))).read().to_pydict()
    planned = [choose_route(p, a, plan.routing) for p, a in zip(audit[C.PQ_SCORE], audit[C.AQ_SCORE])]
    real = plan.info["realised"]
    assert planned.count("full") == real["full"] <= 4 and planned.count("light") == real["light"] <= 6
    assert set(plan.info) >= {"source", "thresholds", "refine_worst", "light_next", "realised"}


# ---------------------------------------------------------------------------------------------
# --scores: reuse an audit


def test_reusing_an_audit_takes_its_scores_and_decodes_only_what_it_refines(tmp_path, fake_engine):
    write_dataset(str(tmp_path / "in"), shards=2, rows=5)
    ok(run_job(job(tmp_path, "audit", mode="score", save_maps=True)))
    audit = rows(tmp_path, "audit")
    scored = len(fake_engine.batches) and sum(fake_engine.batches)
    assert scored == 10
    fake_engine.batches.clear()
    s = ok(run_job(job(tmp_path, "out", scores=str(tmp_path / "audit"), save_maps=True)))
    out = rows(tmp_path, "out")
    assert out[C.PQ_SCORE] == audit[C.PQ_SCORE] and out[C.AQ_SCORE] == audit[C.AQ_SCORE]
    assert out[C.UNMATCHED] == audit[C.UNMATCHED]
    planned = audit[C.ROUTE]
    assert [r if r != "reverted" else "light" for r in out[C.ROUTE]] == planned  # fake guard reverts some lights
    n_refine = sum(r != "skip" for r in planned)
    assert 0 < n_refine < 10
    assert sum(fake_engine.batches) == n_refine  # only the items to refine were scored (for their maps)
    for route, pm, am, apm in zip(planned, out[C.PQ_MAP], out[C.AQ_MAP], audit[C.PQ_MAP]):
        assert pm is not None and am is not None
        if route == "skip":
            assert pm == apm  # the audit's map, copied
    m = manifest(tmp_path, "out")
    assert m["routing"]["source"] == "preset" and m["routing"]["scores_from"] == str(tmp_path / "audit")
    assert s.routes.get("skip") == 10 - n_refine


def test_reusing_an_audit_with_nothing_to_refine_loads_no_model(tmp_path, monkeypatch):
    write_dataset(str(tmp_path / "in"), shards=1, rows=4)
    eng = FakeEngine()
    monkeypatch.setattr(executors, "cached_engine", lambda spec: eng)
    ok(run_job(job(tmp_path, "audit", mode="score")))

    def no_models(spec):
        raise AssertionError("models loaded")

    monkeypatch.setattr(executors, "cached_engine", no_models)
    s = ok(run_job(job(tmp_path, "out", scores=str(tmp_path / "audit"), refine_worst=0.0)))
    assert s.routes == {"skip": 4}
    src = pq.read_table(tmp_path / "in" / "part-a" / "shard-000.parquet")
    out = pq.read_table(tmp_path / "out" / "part-a" / "shard-000.parquet")
    assert out.column("image").to_pylist() == src.column("image").to_pylist()


def test_reused_audit_error_rows_stay_error_rows(tmp_path, fake_engine):
    from job_corpus import write_bad_shard

    corpus = write_bad_shard(str(tmp_path / "in" / "bad.parquet"))
    ok(run_job(job(tmp_path, "audit", mode="score", max_error_rate=1.0)))
    s = run_job(job(tmp_path, "out", scores=str(tmp_path / "audit"), max_error_rate=1.0))
    out = rows(tmp_path, "out")
    assert out[C.STATUS] == rows(tmp_path, "audit")[C.STATUS]
    errs = [e for e in out[C.ERROR] if e]
    assert errs and all("(from the audit)" in e for e in errs)
    assert s.status.get("error") == sum(c[3] == "error" for c in corpus)


def test_audit_mismatch_is_refused_before_any_work(tmp_path, fake_engine):
    write_dataset(str(tmp_path / "in"), shards=2, rows=2)
    ok(run_job(job(tmp_path, "audit", mode="score")))
    audit = str(tmp_path / "audit")
    with pytest.raises(ConfigError, match="another scoring config.*pq.logit_scale"):
        run_job(job(tmp_path, "o1", scores=audit, overrides={"pq": {"logit_scale": 2.0}}))
    run_job(job(tmp_path, "o2", scores=audit, overrides={"routing": {"skip_a": 0.9}}))  # routing is not scoring
    with pytest.raises(ConfigError, match="no maps"):
        run_job(job(tmp_path, "o3", scores=audit, save_maps=True))
    with pytest.raises(ConfigError, match="'refine' run"):
        run_job(job(tmp_path, "o4", scores=str(tmp_path / "o2")))
    write_shard(str(tmp_path / "in" / "part-a" / "shard-002.parquet"), 2)  # a new shard since the audit
    with pytest.raises(InputError, match="shard-002.parquet is not in the audit"):
        run_job(job(tmp_path, "o5", scores=audit))
    (tmp_path / "in" / "part-a" / "shard-002.parquet").unlink()
    write_dataset(str(tmp_path / "in2"), shards=2, rows=2)  # same shard names, another folder
    with pytest.raises(InputError, match="was audited from"):
        run_job(job(tmp_path, "o6", scores=audit, inputs=[tmp_path / "in2"]))
    write_dataset(str(tmp_path / "in"), shards=2, rows=3)  # the inputs changed since the audit
    with pytest.raises(InputError, match="changed since it was audited"):
        run_job(job(tmp_path, "o6", scores=audit))
    with pytest.raises(InputError, match="no job manifest"):
        run_job(job(tmp_path, "o7", scores=str(tmp_path / "in")))


# ---------------------------------------------------------------------------------------------
# Quantile routing end to end


def test_refine_worst_scores_first_then_routes_by_the_data_and_resumes(tmp_path, fake_engine):
    write_dataset(str(tmp_path / "in"), shards=2, rows=10)
    cfg = job(tmp_path, "out", refine_worst=0.2, light_next=0.3)
    s = ok(run_job(cfg))
    audit = rows(tmp_path, "out/__grefine__/audit")
    m = manifest(tmp_path, "out")
    t = m["routing"]["thresholds"]
    assert m["routing"]["source"] == "quantiles" and m["routing"]["refine_worst"] == 0.2
    p = np.array(audit[C.PQ_SCORE], dtype=np.float64)
    a = np.array([np.nan if x is None else x for x in audit[C.AQ_SCORE]], dtype=np.float64)
    expect = quantile_routing(p, a, QuantileRouting(0.2, 0.3))
    assert t == {"skip_p": expect.skip_p, "skip_a": expect.skip_a, "light_p": expect.light_p,
                 "light_a": expect.light_a}
    assert m["result_config"]["preset"]["routing"] == t  # in the config hash: resume uses the same ones
    out = rows(tmp_path, "out")
    planned = [choose_route(p, a, expect) for p, a in zip(audit[C.PQ_SCORE], audit[C.AQ_SCORE])]
    assert [r if r != "reverted" else "light" for r in out[C.ROUTE]] == planned
    assert sum(r == "full" for r in planned) == int(((p < t["light_p"]) | (a < t["light_a"])).sum())
    assert sum(r == "full" for r in planned) <= 4 and sum(r == "light" for r in planned) <= 6  # 20% and 30% of 20
    assert m["routing"]["realised"]["full"] == sum(r == "full" for r in planned)
    assert m["routing"]["realised"]["full_budget"] == 4 and m["routing"]["realised"]["light_budget"] == 6
    assert any("thresholds from the scores" in n for n in s.notes)
    assert not (tmp_path / "out" / "__grefine__" / "audit" / "__grefine__" / "report.html").exists()
    # Resume: the same command recomputes nothing and keeps the thresholds
    fake_engine.batches.clear()
    s2 = ok(run_job(cfg))
    assert s2.shards_run == 0 and fake_engine.batches == []
    assert manifest(tmp_path, "out")["routing"]["thresholds"] == t


def test_refine_worst_on_folder_input_reads_only_what_it_refines(tmp_path, fake_engine):
    write_folder(str(tmp_path / "in"), n=6)
    s = ok(run_job(job(tmp_path, "out", refine_worst=0.0, light_next=0.0)))
    assert s.routes == {"skip": 6} and sum(fake_engine.batches) == 6  # the score pass only
    assert len(list((tmp_path / "out" / "images").rglob("*.*"))) == 6  # the folder mirror is complete


def test_cli_run_with_quantiles_then_with_the_audit_tiny_models(tmp_path, capsys):
    """The real (tiny, random-weight) models through the CLI: a quantile run, then a run reusing its audit."""
    from grefine_curate.cli import app

    write_dataset(str(tmp_path / "in"), shards=1, rows=6)
    base = ["--preset", "tiny", "--executor", "local", "--quiet", "--batch-size", "3"]
    code = app(["run", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--refine-worst", "0.2",
                "--light-next", "0.2", *base], standalone_mode=False)
    stdout = capsys.readouterr().out
    assert code in (0, None) and "thresholds from the scores" in stdout, stdout
    out = rows(tmp_path, "out")
    assert set(out[C.ROUTE]) <= {"skip", "light", "full", "reverted"} and out[C.STATUS] == ["ok"] * 6
    code = app(["run", str(tmp_path / "in"), "--out", str(tmp_path / "again"), "--scores",
                str(tmp_path / "out" / "__grefine__" / "audit"), "--refine-worst", "0.2", "--light-next", "0.2", *base],
               standalone_mode=False)
    assert code in (0, None)
    again = rows(tmp_path, "again")
    assert again[C.ROUTE] == out[C.ROUTE] and again[C.PQ_SCORE] == out[C.PQ_SCORE]  # same routes, same seeds
    assert manifest(tmp_path, "again")["routing"]["thresholds"] == manifest(tmp_path, "out")["routing"]["thresholds"]


def test_report_of_a_score_run_counts_planned_routes_and_names_the_thresholds(tmp_path, fake_engine):
    write_dataset(str(tmp_path / "in"), shards=1, rows=6)
    s = ok(run_job(job(tmp_path, "audit", mode="score")))
    page = (tmp_path / "audit" / "__grefine__" / "report.html").read_text()
    for route in ("skip", "light", "full"):
        assert f'data-count="planned:{route}">{s.routes.get(route, 0)}<' in page
    assert "the preset&#x27;s fixed values" in page and "planned: a score run refines nothing" in page
    ok(run_job(job(tmp_path, "out", scores=str(tmp_path / "audit"), refine_worst=0.5)))
    page = (tmp_path / "out" / "__grefine__" / "report.html").read_text()
    assert "a budget: at most 50.0% full" in page and "scores reused from" in page
    real = manifest(tmp_path, "out")["routing"]["realised"]
    assert f"realised {real['full']} full" in page  # what the budget gave, not only what was asked


def test_cli_exit_2_when_the_audit_does_not_match(tmp_path, fake_engine, capsys, monkeypatch):
    import sys

    from grefine_curate.cli import main

    write_dataset(str(tmp_path / "in"), shards=1, rows=2)
    ok(run_job(job(tmp_path, "audit", mode="score")))
    monkeypatch.setattr(sys, "argv", ["grefine-curate", "run", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                                      "--preset", "sd15", "--scores", str(tmp_path / "audit"), "--executor", "local"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "another scoring config" in err and "clip.model" in err
