"""Which thresholds a refine run routes with, and where its scores come from.

- Fixed thresholds, no audit: the preset's ``[routing]``; the job scores as it goes (one pass).
- ``--scores AUDIT``: p, a and unmatched phrases come from an earlier ``score`` run
  (``pipelines/audit.py``); thresholds are the preset's, or quantiles of the audit's scores.
- ``--refine-worst F`` / ``--light-next G`` without ``--scores``: quantile thresholds need every
  score before the first route, so the job first runs a score pass over everything into
  ``OUT/__grefine__/audit/`` (a score job of its own: resumable, exactly once), then refines reading
  that audit. The thresholds are a function of the audit's scores; they are part of the run's config
  hash and written to the manifest before any refinement, so a resumed run routes with the same
  thresholds (and a run whose audit changed is refused instead of mixing two sets of routes).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

from grefine_curate.curate.config import Preset, RoutingConfig
from grefine_curate.curate.routing import check_routing
from grefine_curate.pipelines.audit import Audit, open_audit, read_scores
from grefine_curate.pipelines.paths import STATE_DIR, fs_uri, join, resolve_fs
from grefine_curate.pipelines.work import Shard
from grefine_curate.pipelines.thresholds import QuantileRouting, describe, quantile_routing

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


def _say(cfg: Any, msg: str) -> None:
    if not cfg.quiet:
        print(msg, file=sys.stderr, flush=True)


def plan_routing(cfg: Any, preset: Preset, shards: list[Shard], caps: list[int | None]):
    """(RoutingPlan, None), or (None, the score pass's JobSummary) when that pass failed or was interrupted.

    ``cfg`` is the run's JobConfig (mode "refine").
    """
    from grefine_curate.pipelines.job import EXIT_ERROR_RATE, EXIT_OK, run_job

    q = quantile_of(cfg.refine_worst, cfg.light_next)
    columns = {"image": cfg.image_column, "prompt": cfg.prompt_column, "id": cfg.id_column}
    scores = cfg.scores
    if scores is None:  # 1. quantiles without an audit: the score pass over everything first
        out_fs, out_root = resolve_fs(cfg.out)
        scores = fs_uri(out_fs, join(out_root, AUDIT_REL))
        first = dataclasses.replace(
            cfg, out=scores, mode="score", scores=None, refine_worst=None, light_next=None, keep_images=False,
            max_error_rate=1.0, write_report=False)
        _say(cfg, f"pass 1 of 2: scoring every image to choose the thresholds (--refine-worst/--light-next) into {scores}")
        summary = run_job(first)
        if summary.exit_code not in (EXIT_OK, EXIT_ERROR_RATE):  # error rows are judged on the refine run
            summary.notes.append(f"the score pass of --refine-worst/--light-next stopped; rerun the same command "
                                 f"to resume it (its output: {scores})")
            return None, summary
    # 2. The audit: checked against this run's inputs and scoring config
    audit = open_audit(scores, shards, caps, preset, columns, cfg.save_maps)
    # 3. The thresholds
    if q is None:
        routing = preset.routing
        info = describe(routing, None, scores_from=scores)
    else:
        p, a = read_scores(audit, shards, caps)
        routing = quantile_routing(p, a, q)
        info = describe(routing, q, n_p=len(p), n_a=len(a), scores_from=scores)
    check_routing(routing)
    if q is not None:
        t = info["thresholds"]
        _say(cfg, f"{'pass 2 of 2: ' if cfg.scores is None else ''}routing with thresholds from {len(p)} scored items: "
                  f"full when p < {t['light_p']:.4f} or a < {t['light_a']:.4f}; skip when p >= {t['skip_p']:.4f} "
                  f"and a >= {t['skip_a']:.4f}")
    return RoutingPlan(routing=routing, audit=audit, info=info), None


__all__ = ["AUDIT_REL", "RoutingPlan", "plan_routing", "quantile_of"]
