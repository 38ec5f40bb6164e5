"""Reusing an audit: ``run --scores AUDIT_OUT`` takes p, a and the unmatched phrases (and the maps,
when saved) from an earlier ``score`` run over the same inputs instead of computing them again.

1. ``open_audit`` checks, before any work, that the audit is usable (exit 2 otherwise, naming what
   differs): it is the OUT of a ``score`` run; the scoring part of its config (CLIP, PQ-Map,
   AQ-Map, pixel limit, columns) equals this run's; every input shard of this run is in it, from
   the same file, unchanged since (size/mtime key of its marker), complete, and covers this run's
   rows; with ``--save-maps`` the audit saved maps too.
2. ``routing_plan.read_score_pairs`` reads every scored (p, a) of the run's shards (for the budget).
3. ``PriorRows`` streams one audit shard beside its input shard (both are in input order, one row
   per input row) and ``attach`` gives each item its audit scores and its route before decoding:
   an item routed ``skip`` is never decoded and never meets a model; an item to refine is decoded
   and scored once more for its full-size maps and refinement prompt (one CLIP forward, small next
   to diffusion), but keeps the audit's p, a and unmatched phrases, so routes follow the audit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from grefine_curate.curate.config import Preset, RoutingConfig
from grefine_curate.curate.errors import ConfigError, InputError
from grefine_curate.curate.results import AQResult, PQResult, ScoreResult
from grefine_curate.curate.routing import choose_route
from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.layout import migrate_legacy_layout
from grefine_curate.pipelines.manifest import config_changes, manifest_path
from grefine_curate.pipelines.commit import read_json
from grefine_curate.pipelines.paths import fs_uri, join, marker_path, resolve_fs
from grefine_curate.pipelines.work import Shard

SCORING_SECTIONS = ("clip", "pq", "aq", "max_pixels")  # the preset parts that decide p, a, P, A


@dataclass(frozen=True)
class Audit:
    uri: str  # as given (--scores)
    root: str  # path on its filesystem
    fingerprint: str  # the audit's config hash
    has_maps: bool  # saved with --save-maps
    outputs: dict[str, str] = field(default_factory=dict)  # input shard -> the audit's output carrying its rows


def scoring_config(preset: dict[str, Any], columns: dict[str, Any]) -> dict[str, Any]:
    return {**{k: preset.get(k) for k in SCORING_SECTIONS}, "columns": columns}


def open_audit(uri: str, shards: list[Shard], caps: list[int | None], preset: Preset,
               columns: dict[str, str | None], save_maps: bool) -> Audit:
    """Check that the audit at ``uri`` holds this run's scores; raise ConfigError/InputError (exit 2) if not."""
    fs, root = resolve_fs(uri)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise InputError(f"--scores {uri}: no such folder; pass the --out folder of an earlier `score` run")
    migrate_legacy_layout(fs, root)
    man = read_json(fs, manifest_path(root))
    if man is None:
        raise InputError(f"--scores {uri}: no job manifest in it; pass the --out folder of an earlier `score` run")
    rc = man.get("result_config") or {}
    if rc.get("mode") != "score":
        raise ConfigError(f"--scores {uri}: it is the output of a {rc.get('mode')!r} run; pass the --out folder of a "
                          "`score` run (`grefine-curate score INPUT... --out AUDIT`)")
    # 1. The scoring part of the config
    theirs = scoring_config(rc.get("preset") or {}, rc.get("columns") or {})
    ours = scoring_config(preset.to_dict(), columns)
    diffs = config_changes(theirs, ours)
    if diffs:
        raise ConfigError(f"--scores {uri}: its scores were made with another scoring config (audit -> this run: "
                          f"{'; '.join(diffs)}); rerun `score` with this config, or run with the audit's preset/config")
    has_maps = bool(rc.get("save_maps"))
    if save_maps and not has_maps:
        raise ConfigError(f"--scores {uri}: the audit has no maps, so --save-maps cannot fill them without scoring "
                          "every image again; rerun `score --save-maps`, or drop --save-maps")
    # 2. The same inputs, unchanged and complete
    entries = {e.get("shard"): e for e in man.get("inputs") or []}
    outputs = {rel: e.get("output") or rel for rel, e in entries.items()}
    fingerprint = man.get("config_hash") or ""
    for shard, cap in zip(shards, caps):
        where = f"--scores {uri}: input shard {shard.rel}"
        entry = entries.get(shard.rel)
        if entry is None:
            raise InputError(f"{where} is not in the audit; score the same inputs (or pass this run the audit's inputs)")
        if entry.get("input") != fs_uri(shard.fs, shard.path):
            raise InputError(f"{where} was audited from {entry.get('input')}, this run reads "
                             f"{fs_uri(shard.fs, shard.path)}; pass the same inputs")
        marker = read_json(fs, marker_path(root, shard.rel))
        if marker is None or marker.get("fingerprint") != fingerprint or \
                fs.get_file_info(join(root, outputs[shard.rel])).type != pafs.FileType.File:
            raise InputError(f"{where} is not complete in the audit; rerun the `score` command that made it "
                             "(it resumes) before reusing it")
        if marker.get("source_key") != shard.source_key:
            raise InputError(f"{where} changed since it was audited (size, time or file list differ); "
                             "rerun `score` on the current inputs")
        theirs_cap = marker.get("row_cap")
        if theirs_cap is not None and (cap is None or cap > theirs_cap):
            raise InputError(f"{where}: the audit scored only its first {theirs_cap} rows (--limit) and this run "
                             f"needs {cap if cap is not None else shard.num_rows}; rerun `score` without --limit")
    return Audit(uri=uri, root=root, fingerprint=fingerprint, has_maps=has_maps, outputs=outputs)


# ---------------------------------------------------------------------------------------------
# Per shard, inside the processor


@dataclass
class Prior:
    """One item's scores from the audit."""

    p: float
    a: float | None
    unmatched: list[str]
    pq_png: bytes | None  # the audit's 64x64 maps (--save-maps)
    aq_png: bytes | None


def stub_score(prior: Prior) -> ScoreResult:
    """A ScoreResult carrying the audit's p and a, for items that are not scored again (no maps)."""
    empty = np.zeros((0, 0), np.float32)
    aq = None if prior.a is None else AQResult(a=prior.a, clip_score=math.nan, A=empty)
    return ScoreResult(pq=PQResult(p=prior.p, factors={}, P=empty), aq=aq)


def with_prior(fresh: ScoreResult, prior: Prior) -> ScoreResult:
    """A fresh score (maps, refinement prompt) with the audit's p and a, which decided the route."""
    import dataclasses

    aq = fresh.aq
    if aq is not None and prior.a is not None:
        aq = dataclasses.replace(aq, a=prior.a)
    return ScoreResult(pq=dataclasses.replace(fresh.pq, p=prior.p), aq=aq)


class PriorRows:
    """The audit's rows of one shard, taken in step with the input batches."""

    def __init__(self, scores_uri: str, rel: str, has_maps: bool, start: int = 0):
        fs, root = resolve_fs(scores_uri)
        self.where = f"{scores_uri}: {rel}"
        man = read_json(fs, manifest_path(root)) or {}
        entry = next((e for e in man.get("inputs") or [] if e.get("shard") == rel), {})
        self._file = fs.open_input_file(join(root, entry.get("output") or rel))  # the audit names its outputs
        cols = [C.ID, C.STATUS, C.ERROR, C.PQ_SCORE, C.AQ_SCORE, C.UNMATCHED]
        pf = pq.ParquetFile(self._file)
        if has_maps:
            cols += [c for c in (C.PQ_MAP, C.AQ_MAP) if c in pf.schema_arrow.names]
        self._batches = pf.iter_batches(batch_size=256, columns=cols)
        self._buf: list[dict[str, Any]] = []
        if start:  # a work unit from row `start` on (units.py): the audit's rows before it are not ours
            self.take(start)

    def take(self, n: int) -> list[dict[str, Any]]:
        while len(self._buf) < n:
            batch = next(self._batches, None)
            if batch is None:
                raise InputError(f"{self.where}: the audit shard has fewer rows than its input; rerun `score`")
            self._buf.extend(batch.to_pylist())
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def attach(self, items: list, routing: RoutingConfig, refine: bool) -> None:
        """Give each item its audit scores and route; mark the ones that need no pixels."""
        for it, row in zip(items, self.take(len(items))):
            if row.get(C.ID) is not None and row[C.ID] != it.item_id:
                raise InputError(f"{self.where}: audit row {row[C.ID]!r} does not line up with input item "
                                 f"{it.item_id!r}; rerun `score` on the current inputs")
            it.needs_pixels = False
            if row.get(C.STATUS) != C.STATUS_OK:
                if it.source_error is None:
                    it.source_error = f"{row.get(C.ERROR) or 'error'} (from the audit)"
                continue
            it.prior = Prior(p=float(row[C.PQ_SCORE]), a=None if row[C.AQ_SCORE] is None else float(row[C.AQ_SCORE]),
                             unmatched=list(row.get(C.UNMATCHED) or []), pq_png=row.get(C.PQ_MAP),
                             aq_png=row.get(C.AQ_MAP))
            it.route = choose_route(it.prior.p, it.prior.a, routing)
            it.needs_pixels = refine and it.route != "skip"
            if not it.needs_pixels:
                it.score = stub_score(it.prior)
                it.pq_png, it.aq_png = it.prior.pq_png, it.prior.aq_png

    def close(self) -> None:
        self._file.close()


__all__ = ["Audit", "Prior", "PriorRows", "open_audit", "scoring_config", "stub_score", "with_prior"]
