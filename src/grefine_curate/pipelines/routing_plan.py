"""Which thresholds a refine run routes with, and where its scores come from.

- Fixed thresholds, no audit: the preset's ``[routing]``; the job scores as it goes (one pass).
- ``--scores AUDIT``: p, a and unmatched phrases come from an earlier ``score`` run
  (``pipelines/audit.py``); thresholds are the preset's, or quantiles of the audit's scores.
- ``--refine-worst F`` / ``--light-next G``: a budget, at most floor(F x n) items full and floor(G x n)
  light (``pipelines/thresholds.py``: the order, and how thresholds on p and a realise it exactly).
- ``--refine-worst F`` / ``--light-next G`` without ``--scores``: the budget's thresholds need every
  score before the first route, so the job first runs a score pass over everything into
  ``OUT/__grefine__/audit/`` (a score job of its own: resumable, exactly once), then refines reading
  that audit. The thresholds are a function of the audit's scores; they are part of the run's config
  hash and written to the manifest before any refinement, so a resumed run routes with the same
  thresholds (and a run whose audit changed is refused instead of mixing two sets of routes).
- A ``score`` run with ``--refine-worst`` / ``--light-next`` plans the same way: its planned routes
  (``grefine_route``) are the ones a ``run`` with that budget takes (``plans_routing`` says when the
  job calls ``plan_routing``; ``check_plan_options`` is the option check of both modes).
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pyarrow.parquet as pq
from dataclasses import dataclass
from typing import Any

from grefine_curate.curate.config import Preset, RoutingConfig
from grefine_curate.curate.routing import check_routing
from grefine_curate.curate.errors import ConfigError
from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.audit import Audit, open_audit
from grefine_curate.pipelines.paths import INTERNAL_SUFFIX, STATE_DIR, fs_uri, join, resolve_fs
from grefine_curate.pipelines.work import EXIT_ERROR_RATE, EXIT_OK
from grefine_curate.pipelines.thresholds import QuantileRouting, budget_routing, describe
from grefine_curate.pipelines.work import Shard

AUDIT_REL = f"{STATE_DIR}/audit"  # the score pass of quantile routing without --scores


@dataclass
class RoutingPlan:
    routing: RoutingConfig  # the thresholds in force
    audit: Audit | None  # where p, a and unmatched phrases come from (None: scored in this run)
    info: dict[str, Any]  # what the manifest and report record


def quantile_of(refine_worst: float | None, light_next: float | None) -> QuantileRouting | None:
    if refine_worst is None and light_next is None:
        return None
    q = QuantileRouting(refine_worst=refine_worst or 0.0, light_next=light_next or 0.0)
    q.check()
    return q


def plans_routing(cfg: Any) -> bool:
    """Whether the job takes its thresholds (and, with --scores, its scores) from ``plan_routing``."""
    fractions = cfg.refine_worst is not None or cfg.light_next is not None
    if cfg.mode == "score":
        return fractions  # planned routes at a budget (--scores only says whose scores set it)
    return cfg.mode == "refine" and (bool(cfg.scores) or fractions)


def check_plan_options(cfg: Any) -> None:
    """ConfigError (exit 2) for routing options that do not go together; the fractions themselves are checked."""
    quantile_of(cfg.refine_worst, cfg.light_next)
    if cfg.mode == "score" and cfg.scores and cfg.refine_worst is None and cfg.light_next is None:
        raise ConfigError("--scores in a score run gives the scores that --refine-worst/--light-next budget from; "
                          "without them a score run plans routes with the preset's thresholds")


def read_score_pairs(audit: Audit, shards: list[Shard], caps: list[int | None]) -> tuple[np.ndarray, np.ndarray]:
    """(p, a) of every scored row of the run's shards, paired: a is NaN where a row has no prompt."""
    fs, _ = resolve_fs(audit.uri)
    ps, as_ = [], []
    for shard, cap in zip(shards, caps):
        with fs.open_input_file(join(audit.root, audit.outputs.get(shard.rel, shard.record_rel))) as f:
            t = pq.ParquetFile(f).read(columns=[C.STATUS, C.PQ_SCORE, C.AQ_SCORE])
        if cap is not None:
            t = t.slice(0, cap)
        ok = np.asarray([s == C.STATUS_OK for s in t.column(C.STATUS).to_pylist()], dtype=bool)
        p = t.column(C.PQ_SCORE).to_numpy(zero_copy_only=False).astype(np.float64)  # nulls: NaN
        a = t.column(C.AQ_SCORE).to_numpy(zero_copy_only=False).astype(np.float64)
        keep = ok & np.isfinite(p)
        ps.append(p[keep])
        as_.append(a[keep])
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
    return cat(ps), cat(as_)


def _say(cfg: Any, msg: str) -> None:
    if not cfg.quiet:
        print(msg, file=sys.stderr, flush=True)


def needs_score_pass(cfg: Any) -> bool:
    """--refine-worst/--light-next without --scores: the thresholds need every score before the first route."""
    return plans_routing(cfg) and cfg.scores is None


def score_pass(cfg: Any, run: Any) -> tuple[str, Any]:
    """Pass 1 of a two-pass job: score everything into OUT/__grefine__/audit (a score job of its own,
    resumable, outputs named *.scores). Returns (the audit's URI, None), or (URI, the pass's JobSummary)
    when it stopped. ``run`` runs a job (the job's orchestrator passes ``run_job``)."""
    out_fs, out_root = resolve_fs(cfg.out)
    scores = fs_uri(out_fs, join(out_root, AUDIT_REL))
    first = dataclasses.replace(
        cfg, out=scores, mode="score", scores=None, refine_worst=None, light_next=None, keep_images=False,
        max_error_rate=1.0, write_report=False, output_suffix=INTERNAL_SUFFIX)
    _say(cfg, f"pass 1 of 2: scoring every image to choose the thresholds (--refine-worst/--light-next) into {scores}")
    summary = run(first)
    if summary.exit_code not in (EXIT_OK, EXIT_ERROR_RATE):  # error rows are judged on the refine run
        summary.notes.append(f"the score pass of --refine-worst/--light-next stopped; rerun the same command "
                             f"to resume it (its output: {scores})")
        return scores, summary
    return scores, None


def plan_routing(cfg: Any, preset: Preset, shards: list[Shard], caps: list[int | None]) -> RoutingPlan:
    """The thresholds of a run that reads an audit (``cfg.scores``: given, or the score pass's)."""
    q = quantile_of(cfg.refine_worst, cfg.light_next)
    columns = {"image": cfg.image_column, "prompt": cfg.prompt_column, "id": cfg.id_column}
    scores = cfg.scores
    assert scores is not None, "plan_routing reads an audit: run score_pass first (job.run_job does)"
    # 2. The audit: checked against this run's inputs and scoring config
    audit = open_audit(scores, shards, caps, preset, columns, cfg.save_maps)
    # 3. The thresholds
    if q is None:
        routing = preset.routing
        info = describe(routing, None, scores_from=scores)
    else:
        p, a = read_score_pairs(audit, shards, caps)
        budget = budget_routing(p, a, q)
        routing = budget.routing
        info = describe(routing, q, n_p=budget.n, n_a=budget.n_a, scores_from=scores, realised=budget.realised())
    check_routing(routing)
    if q is not None:
        t = info["thresholds"]
        step = "pass 2 of 2: " if scores.rstrip("/").endswith(AUDIT_REL) else ""
        _say(cfg, f"{step}routing with thresholds from {budget.n} scored items: "
                  f"full when p < {t['light_p']:.4f} or a < {t['light_a']:.4f}; skip when p >= {t['skip_p']:.4f} "
                  f"and a >= {t['skip_a']:.4f}; {realised_line(budget.realised())}")
    return RoutingPlan(routing=routing, audit=audit, info=info)


def realised_line(r: dict[str, Any]) -> str:
    """One line for the job's notes: the budget and what came out (ties can take fewer)."""
    return (f"{r['full']} full ({r['full_fraction']:.1%}, budget {r['full_budget']}), {r['light']} light "
            f"({r['light_fraction']:.1%}, budget {r['light_budget']}), {r['skip']} skip")


__all__ = ["AUDIT_REL", "RoutingPlan", "check_plan_options", "needs_score_pass", "plan_routing", "plans_routing",
           "quantile_of", "score_pass",
           "read_score_pairs", "realised_line"]
