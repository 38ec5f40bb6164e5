"""The curation job behind ``grefine-curate run`` / ``score``: G-Refine (paper sec. 3) over a data set.

Score every image (PQ-Map p/P, AQ-Map a/A), route it, refine the low-quality ones with the
balanced refiner, and write everything back with per-item scores. ``run_job(JobConfig)`` is the one
entry point; it returns a ``JobSummary`` whose ``exit_code`` follows the documented contract:

    0  done
    1  failure (a shard failed after its retries; an unexpected error propagates and maps to 1)
    2  bad usage or config: raised as ConfigError / InputError before any work
    3  done, but the error rate exceeded ``max_error_rate``
    130 interrupted (Ctrl-C): a clean stop, finished shards kept

Steps: 1. check options  2. resolve the preset  3. find and check every input shard (formats/)
3b. take OUT's lock  3c. thresholds from an audit  4. compare with OUT's manifest (refuse a config
change unless ``force``)  5. clean stale temporaries  6. skip complete shards (resume)  7. run the
executor  8. write the manifest, return the summary  9. the report. ``run_job`` orchestrates: a
score pass first when the thresholds come from the data (routing_plan.py), then this pass.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from grefine_curate.curate import config
from grefine_curate.curate.config import Preset
from grefine_curate.curate.errors import ConfigError, InputError
from grefine_curate.curate.routing import check_routing
from grefine_curate.pipelines.commit import clean_stale_temporaries, read_json, try_delete
from grefine_curate.pipelines.engines import EngineSpec
from grefine_curate.pipelines.executors import ExecReport, Progress
from grefine_curate.pipelines.formats import get_format
from grefine_curate.pipelines.layout import migrate_legacy_layout
from grefine_curate.pipelines.limits import find_shrinks, refuse_shrink, remove_past_limit
from grefine_curate.pipelines.lock import acquire
from grefine_curate.pipelines.manifest import (
    check_config,
    config_hash,
    manifest_path,
    model_ids,
    package_versions,
    result_config,
    shard_states,
    totals,
    write_manifest,
)
from grefine_curate.pipelines.models import check_weights
from grefine_curate.pipelines.paths import (
    STATE_DIR,
    TMP_MARK,
    fs_uri,
    join,
    marker_path,
    mask_secret,
    reachable,
    resolve_fs,
    store_error,
)
from grefine_curate.pipelines.routing_plan import (
    check_plan_options,
    needs_score_pass,
    plan_routing,
    plans_routing,
    realised_line,
    score_pass,
)
from grefine_curate.pipelines.sources import discover
from grefine_curate.pipelines.thresholds import describe as describe_routing
from grefine_curate.pipelines.units import UnitLedger
from grefine_curate.pipelines.work import (  # noqa: F401 (the exit codes are the job's public names)
    EXIT_ERROR_RATE,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ColumnSpec,
    ProcessOptions,
    ShardTask,
)

MODES = ("refine", "score")
EXECUTORS = ("ray", "local")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")



@dataclass
class JobConfig:
    """Options of one run (the CLI builds this; every field has a usable default except inputs/out)."""

    inputs: list[str]  # files, folders (recursive) or globs of any registered format (formats/); local or s3:// gs://
    out: str  # output root (local path or URI)
    mode: str = "refine"  # "refine" | "score" (score-only audit)
    preset: str = "sdxl"  # preset name (configs/<name>.toml) or path to a .toml
    config_file: str | None = None  # user TOML merged over the preset (same tables)
    overrides: dict[str, Any] | None = None  # nested overrides merged last ({"routing": {"skip_p": 0.8}})
    executor: str = "ray"  # "ray" | "local"
    address: str | None = None  # Ray cluster address (default: RAY_ADDRESS, else a local instance)
    workers: int | None = None  # actors (default: one per GPU; CPU-only: cluster CPUs // 4, at least 1)
    gpus_per_worker: float = 1.0  # GPUs per actor when the cluster has GPUs
    batch_size: int = 8  # images per model call
    limit: int | None = None  # process only the first N rows (in input order)
    save_maps: bool = False  # store P and A as 64x64 8-bit PNG in pq_map / aq_map
    resume: bool = True  # skip shards whose output is complete
    force: bool = False  # accept a config change against OUT's manifest (recomputes every shard)
    max_error_rate: float = 0.1  # exit code 3 when error rows / rows exceeds this
    quiet: bool = False  # no progress bars or log lines (failures are still printed)
    keep_images: bool = False  # score mode: keep the image bytes (Parquet) / copy images (folders)
    input_columns: bool = True  # score mode, Parquet input: keep the input's other columns in the output
    image_column: str | None = None  # None: first of image, img, jpg, jpeg, png, webp, image_bytes
    prompt_column: str | None = None  # None: first of prompt, text, caption, txt (none found: PQ only)
    id_column: str | None = None  # None: first of id, key, uid of plain type, else "<shard relative path>#<row index>"
    models_dir: str | None = None  # local model cache (Hugging Face cache layout)
    image_format: str = "PNG"  # encoding of refined images in Parquet outputs: PNG | JPEG | WEBP
    decode_threads: int = 2  # CPU threads decoding images beside the model, per worker
    folder_shard_size: int = 1000  # images per shard of an image folder
    unit_rows: int | None = None  # rows per work unit (None: the preset's unit_rows / score_unit_rows)
    threads_per_worker: int | None = None  # Ray: torch threads per actor (None: its CPUs; 2 with a GPU)
    max_attempts: int = 3  # Ray: attempts of a shard whose worker died
    draft_decode: bool = True  # score mode: decode JPEGs DCT-scaled to the CLIP input size (faster)
    scores: str | None = None  # refine mode: reuse p, a, unmatched phrases from this `score` output
    refine_worst: float | None = None  # a budget: at most floor(F x n) items full, worst by the worse of p/a percentiles
    light_next: float | None = None  # with refine_worst: at most floor(G x n) more items light
    write_report: bool = True  # write OUT/__grefine__/report.html at the end (not for the inner score pass)
    output_suffix: str | None = None  # name outputs *.<suffix> instead of *.parquet (the inner score pass under OUT)
    allow_paths: list[str] | None = None  # folders that image paths in the data may name (besides the input's own)
    # Seams for tests and embedding (never in the manifest): how the models are built, a hook after each batch
    engine_factory: Any = None  # callable(EngineSpec) -> Engine, picklable for Ray (default: the real models)
    batch_hook: Any = None  # callable(batch_index), picklable for Ray (faults.py)
    executor_impl: Any = None  # an object with executors.Executor's run(); overrides `executor` when given
    wait_lock: float = 0.0  # seconds to wait for another job holding OUT (0: refuse at once, naming it)


SEAMS = ("engine_factory", "batch_hook", "executor_impl")  # injected objects: never in the manifest or the config hash
JobOptions = JobConfig  # `run` and `score` share one options object (mode says which)


@dataclass
class JobSummary:
    out: str
    mode: str
    state: str  # "done" | "failed" | "error-rate" | "interrupted"
    exit_code: int
    config_hash: str
    shards_total: int
    shards_run: int  # completed by this run
    shards_skipped: int  # complete from an earlier run (resume)
    shards_failed: list[tuple[str, str]]  # (shard, message)
    rows: int  # rows in complete output shards (this run and earlier ones)
    status: dict[str, int]  # "ok" / "error" -> rows
    routes: dict[str, int]  # "skip" / "light" / "full" / "reverted" -> rows (refine mode)
    error_rate: float
    rows_this_run: int
    wall_s: float
    startup_s: float  # Ray init (when started here) + model loading, before the first shard
    items_per_s: float  # rows of this run / (wall time - start-up: Ray init and model loading)
    retries: int
    manifest: str
    removed_temporaries: int = 0
    units_run: int = 0  # work units completed by this run
    units_total: int = 0  # work units of the shards this run had to do (done before or now)
    adopted: int = 0  # complete outputs found without their marker, adopted from their footer record
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """A short human-readable report (the CLI prints it)."""
        routes = ", ".join(f"{k} {v}" for k, v in sorted(self.routes.items())) or "-"
        complete = self.shards_run + self.shards_skipped
        unfinished = self.shards_total - complete - len(self.shards_failed)
        out = [
            f"{self.state}: {self.rows} rows in "
            f"{self.shards_total if complete == self.shards_total else f'{complete} of {self.shards_total}'} shards "
            f"under {self.out} ({self.shards_run} run now, {self.shards_skipped} already complete, "
            f"{len(self.shards_failed)} failed{f', {unfinished} unfinished' if unfinished > 0 else ''})",
            f"status: ok {self.status.get('ok', 0)}, error {self.status.get('error', 0)} "
            f"(error rate {self.error_rate:.1%})" + (f"; routes: {routes}" if self.mode == "refine" else
                                                      f"; planned routes (a run would do): {routes}"),
            f"this run: {self.rows_this_run} rows ({self.units_run} work units) in {self.wall_s:.1f}s "
            f"({self.items_per_s:.1f} img/s after "
            f"{self.startup_s:.1f}s of start-up)",
            f"manifest: {self.manifest}",
        ]
        out += [f"failed shard {rel}: {msg}" for rel, msg in self.shards_failed]
        return out + self.notes


def _check_options(cfg: JobConfig) -> None:
    def bad(msg: str) -> None:
        raise ConfigError(msg)

    if cfg.mode not in MODES:
        bad(f"mode {cfg.mode!r} is not one of {', '.join(MODES)}")
    if cfg.executor not in EXECUTORS:
        bad(f"executor {cfg.executor!r} is not one of {', '.join(EXECUTORS)}")
    if cfg.batch_size < 1:
        bad(f"batch size must be at least 1, got {cfg.batch_size}")
    if cfg.limit is not None and cfg.limit < 1:
        bad(f"limit must be at least 1 when given, got {cfg.limit}")
    if cfg.workers is not None and cfg.workers < 1:
        bad(f"workers must be at least 1 when given, got {cfg.workers}")
    if cfg.gpus_per_worker < 0:
        bad(f"gpus per worker must be >= 0, got {cfg.gpus_per_worker}")
    if not 0.0 <= cfg.max_error_rate <= 1.0:
        bad(f"max error rate must be within [0, 1], got {cfg.max_error_rate}")
    if cfg.image_format.upper() not in IMAGE_FORMATS:
        bad(f"image format {cfg.image_format!r} is not one of {', '.join(IMAGE_FORMATS)}")
    if cfg.folder_shard_size < 1 or cfg.decode_threads < 1 or cfg.max_attempts < 1:
        bad("folder_shard_size, decode_threads and max_attempts must be at least 1")
    if cfg.threads_per_worker is not None and cfg.threads_per_worker < 1:
        bad(f"threads per worker must be at least 1 when given, got {cfg.threads_per_worker}")
    if cfg.wait_lock < 0:
        bad(f"--wait-lock must be >= 0 seconds, got {cfg.wait_lock}")
    if cfg.unit_rows is not None and cfg.unit_rows < 1:
        bad(f"unit rows must be at least 1 when given (--unit-rows), got {cfg.unit_rows}")
    if not cfg.out:
        bad("an output directory is required (--out)")
    check_plan_options(cfg)  # fractions checked; a score run takes them, and --scores only with them


def resolve_preset(cfg: JobConfig) -> Preset:
    return config.resolve_preset(cfg.preset, cfg.config_file, cfg.overrides)


def _row_caps(nums: list[int], limit: int | None) -> list[int | None]:
    """--limit in input order: a full shard has cap None (so its marker matches an unlimited run)."""
    if limit is None:
        return [None] * len(nums)
    caps: list[int | None] = []
    left = limit
    for n in nums:
        take = min(n, left)
        caps.append(None if take == n else take)
        left -= take
    return caps


def run_job(cfg: JobConfig) -> JobSummary:
    """Run (or resume) a curation job. Raises ConfigError/InputError (exit 2) before any work.

    The orchestrator: one pass; or, for thresholds from the data (--refine-worst/--light-next without
    --scores), a score pass into OUT/__grefine__/audit first, then this pass reading it as --scores."""
    _check_options(cfg)
    if needs_score_pass(cfg):
        audit, stopped = score_pass(cfg, run=run_job)
        if stopped is not None:
            return stopped
        cfg = dataclasses.replace(cfg, scores=audit)
    return _run_pass(cfg)


def _run_pass(cfg: JobConfig) -> JobSummary:
    """One pass over the inputs (steps 1-9 of the module docstring)."""
    t0 = time.perf_counter()
    # 1. Check options
    _check_options(cfg)
    image_format = cfg.image_format.upper()
    # 2. Resolve the preset (and check what the models only read later)
    preset = resolve_preset(cfg)
    check_routing(preset.routing)
    for d in cfg.allow_paths or []:
        if "://" not in d and not os.path.isdir(d):
            raise ConfigError(f"--allow-paths {d}: no such folder")
    # 3. Find and check every input shard (metadata only)
    columns = ColumnSpec(image=cfg.image_column, prompt=cfg.prompt_column, id=cfg.id_column)
    shards = discover(cfg.inputs, columns, out=cfg.out, folder_shard_size=cfg.folder_shard_size)
    if cfg.output_suffix:  # Parquet bytes under another name: 'OUT/**/*.parquet' globs see outputs only
        for s in shards:
            s.record_rel = posixpath.splitext(s.record_rel)[0] + cfg.output_suffix
    total_rows = sum(s.num_rows for s in shards)
    if total_rows == 0:
        names = ", ".join(s.path for s in shards[:3]) + (", ..." if len(shards) > 3 else "")
        raise InputError(f"the input has no rows ({len(shards)} shard(s) found, all empty: {names}): nothing to do")
    caps = _row_caps([s.num_rows for s in shards], cfg.limit)
    out_fs, out_root = resolve_fs(cfg.out)
    reachable(out_fs, out_root, cfg.out)  # a wrong endpoint is one line here, not a traceback later
    migrate_legacy_layout(out_fs, out_root)  # before anything reads or writes OUT/__grefine__
    shrinks = find_shrinks(out_fs, out_root, shards, caps)  # a smaller --limit than OUT's finished rows
    keep = [i for i, (s, c) in enumerate(zip(shards, caps)) if c is None or c > 0]
    shards, caps = [shards[i] for i in keep], [caps[i] for i in keep]
    # 3b. One job at a time on OUT (a killed holder's lock is taken over)
    try:
        lock = acquire(out_fs, out_root, what=f"{cfg.mode} of {', '.join(mask_secret(i) for i in cfg.inputs[:3])}",
                       wait_s=cfg.wait_lock)
    except OSError as e:  # fail before any work, not after the first shard
        if not isinstance(out_fs, pafs.LocalFileSystem):
            raise store_error(cfg.out, e) from e
        raise InputError(f"--out {cfg.out}: cannot create or write the output folder ({e}); "
                         "choose a writable location") from e
    try:
        return _run_locked(cfg, t0, preset, image_format, shards, caps, shrinks, out_fs, out_root)
    finally:
        lock.release()


def _run_locked(cfg: JobConfig, t0: float, preset: Preset, image_format: str, shards: list, caps: list,
                shrinks: list, out_fs: Any, out_root: str) -> JobSummary:
    """Steps 3c-9 of ``run_job``, holding OUT's lock."""
    # 3c. Thresholds and where the scores come from (--scores, --refine-worst, --light-next)
    plan = None
    if plans_routing(cfg):
        plan = plan_routing(cfg, preset, shards, caps)
        preset = dataclasses.replace(preset, routing=plan.routing)
    # 4. Compare with OUT's manifest
    draft = preset.clip.image_size if (cfg.mode == "score" and cfg.draft_decode) else None
    rcfg = result_config(preset, cfg.mode, cfg.save_maps, cfg.keep_images, image_format,
                         {"image": cfg.image_column, "prompt": cfg.prompt_column, "id": cfg.id_column}, draft)
    rcfg["input_columns"] = cfg.input_columns
    if cfg.mode == "score":
        rcfg["planned_routes"] = True  # grefine_route / grefine_route_planned columns (older outputs lack them)
    if plan is not None:
        rcfg["scores_from"] = plan.audit.fingerprint  # the audit's config hash: its scores decide the routes
    fingerprint = config_hash(rcfg)
    check_config(out_fs, out_root, rcfg, cfg.force or not cfg.resume)  # --no-resume rewrites every row
    if shrinks and not cfg.force:
        refuse_shrink(shrinks, cfg.limit, out_root)
    try:
        out_fs.create_dir(out_root, recursive=True)
        write_probe = join(out_root, f"{STATE_DIR}/.write-probe{TMP_MARK}")
        out_fs.create_dir(join(out_root, STATE_DIR), recursive=True)
        with out_fs.open_output_stream(write_probe) as f:
            f.write(b"")
        out_fs.delete_file(write_probe)
    except OSError as e:  # fail before any work, not after the first shard
        if not isinstance(out_fs, pafs.LocalFileSystem):
            raise store_error(cfg.out, e) from e
        raise InputError(f"--out {cfg.out}: cannot create or write the output folder ({e}); "
                         "choose a writable location") from e
    # 5. Stale temporaries of a killed run
    removed = clean_stale_temporaries(out_fs, out_root)
    # 6. Resume: complete shards are skipped (a complete output without its marker is adopted); the
    #    others are cut into work units, and units committed by an earlier run are kept
    started_at = time.time()
    if not cfg.resume:  # --no-resume rewrites every row: earlier markers must not count as this run's
        for s in shards:
            try_delete(out_fs, marker_path(out_root, s.rel))
    states = shard_states(out_fs, out_root, shards, caps, fingerprint, cfg.resume)
    unit_rows = cfg.unit_rows or (preset.score_unit_rows if cfg.mode == "score" else preset.unit_rows)
    ledger = UnitLedger(out_fs, out_root, fingerprint)
    tasks: list[ShardTask] = []
    units_total = 0
    for st in states:
        if st.complete:
            ledger.drop_parts(st.shard.rel)  # parts of an interrupted recompute of a complete shard: orphans
            continue
        planned = ledger.plan(st.shard, st.row_cap, unit_rows, cfg.resume)
        units_total += len(ledger.books[st.shard.rel].units) if st.shard.rel in ledger.books else len(planned)
        tasks.extend(planned)
    tasks.sort(key=lambda t: -t.rows)  # largest first (stable: input order among equals)
    skipped = sum(st.complete for st in states)
    adopted = sum(st.adopted for st in states)
    if tasks and cfg.engine_factory is None and cfg.executor_impl is None:  # seconds, before Ray or any model starts
        try:
            check_weights(preset, cfg.mode, cfg.models_dir)
        except BaseException as e:  # a failed start is recorded, without taking OUT from an earlier config
            _record_failed_start(out_fs, out_root, fingerprint, rcfg, e)
            raise
    limit_note = remove_past_limit(out_fs, out_root, shrinks, cfg.limit) if shrinks else None  # --force only
    base = {
        "state": "running",
        "config_hash": fingerprint,
        "preset_hash": preset.hash(),
        "preset": preset.name,
        "models": model_ids(preset, cfg.mode),
        "packages": package_versions(),
        "result_config": rcfg,
        "routing": {**plan.info, "planned": cfg.mode == "score"} if plan is not None else {**describe_routing(preset.routing, None),
                                                      "planned": cfg.mode == "score"},
        "job": _without_secrets(cfg),
        "inputs": [{"shard": s.rel, "format": s.format, "output": s.record_rel, "input": fs_uri(s.fs, s.path),
                    "rows": s.num_rows, "row_cap": c}
                   for s, c in zip(shards, caps)],
    }
    write_manifest(out_fs, out_root, base)
    # 7. Run
    opts = ProcessOptions(mode=cfg.mode, batch_size=cfg.batch_size, save_maps=cfg.save_maps,
                          keep_images=cfg.keep_images, input_columns=cfg.input_columns, image_format=image_format,
                          max_pixels=preset.max_pixels,
                          draft_size=draft, decode_threads=cfg.decode_threads, seed=preset.seed,
                          fingerprint=fingerprint, routing=preset.routing,
                          scores_uri=plan.audit.uri if plan is not None else None,  # both modes: scored once
                          scores_maps=plan.audit.has_maps if plan is not None else False,
                          allow_paths=tuple(cfg.allow_paths or ()), batch_hook=cfg.batch_hook)
    spec = EngineSpec(preset=preset, mode=cfg.mode, models_dir=cfg.models_dir, factory=cfg.engine_factory)
    todo_rows = sum(t.rows for t in tasks)
    progress = Progress(todo_rows, len(states) - skipped, quiet=cfg.quiet)
    if skipped:
        progress.say(f"resume: {skipped} of {len(states)} shards already complete in {out_root}"
                     + (f" ({adopted} adopted from their footer record)" if adopted else ""))
    if units_total > len(tasks):
        progress.say(f"resume: {units_total - len(tasks)} of {units_total} work units already committed")
    if removed:
        progress.say(f"removed {removed} temporary file(s) left by an interrupted run")
    report = ExecReport()
    early = ledger.complete_now()  # every unit committed before a kill, not yet assembled
    for res in early:
        progress.shard_done(res)
    try:
        report = make_executor(cfg).run(tasks, spec, opts, progress, finish=ledger.finish)
        report.results[:0] = early
        assembled, failed = ledger.drain()  # files whose last unit landed, assembled on a driver thread
        for res in assembled:
            report.results.append(res)
            progress.shard_done(res)
        for rel, msg in failed:
            report.failures.append((rel, msg))
            progress.say(f"shard failed: {rel}: {msg}", always=True)
    except KeyboardInterrupt:
        report.interrupted = True
    except BaseException as e:  # a failed start (models, cluster): the manifest must not say "running"
        write_manifest(out_fs, out_root, {**base, "state": "failed", "exit_code": exit_code_for(e),
                                          "error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        progress.close()
    # 8. Manifest and summary (counts over every complete shard, this run's and earlier ones)
    after = shard_states(out_fs, out_root, shards, caps, fingerprint, resume=True)
    markers = [st.marker for st in after if st.complete]
    for name in dict.fromkeys(s.format for s in shards):  # files that describe OUT as a data set (formats/)
        get_format(name).finish(out_fs, out_root, [st.shard for st in after if st.complete and st.shard.format == name],
                                cfg.mode, cfg.keep_images)
    tot = totals(markers)
    rows = tot["rows"]
    errors = tot["status"].get("error", 0)
    error_rate = errors / rows if rows else 0.0
    wall = time.perf_counter() - t0
    # This run's shards from the markers, not from what the driver heard: after Ctrl-C a Ray worker
    # may have finished a shard (output and marker on disk, complete) whose result never arrived.
    # Rows are those the units of this run processed, plus such unheard shards (a shard assembled from
    # units all committed by an earlier run adds none).
    before = {st.shard.rel for st in states if st.complete}
    # (a marker this run wrote: an output adopted from an earlier run's footer is not this run's work)
    done_now = [st for st in after if st.complete and st.shard.rel not in before
                and float(st.marker.get("finished_at") or 0) >= started_at]
    assembled_only = {r.rel for r in early}
    rows_run = sum(report.rows_by_shard.values()) + sum(
        int(st.marker.get("rows", 0)) for st in done_now
        if st.shard.rel not in report.rows_by_shard and st.shard.rel not in assembled_only)
    busy = max(wall - report.startup_s, 1e-9)
    if report.interrupted:
        state, code = "interrupted", EXIT_INTERRUPTED
    elif report.failures:
        state, code = "failed", EXIT_FAILURE
    elif error_rate > cfg.max_error_rate:
        state, code = "error-rate", EXIT_ERROR_RATE
    else:
        state, code = "done", EXIT_OK
    notes = [limit_note] if limit_note else []
    if plan is not None and plan.info.get("source") == "quantiles":
        t = plan.info["thresholds"]
        notes.append(f"thresholds from the scores (budget: worst {plan.info['refine_worst']:.1%} full, next "
                     f"{plan.info['light_next']:.1%} light; {realised_line(plan.info['realised'])}): full when "
                     f"p < {t['light_p']:.4f} or a < {t['light_a']:.4f}; skip when p >= {t['skip_p']:.4f} and "
                     f"a >= {t['skip_a']:.4f}")
    if code == EXIT_ERROR_RATE:
        notes.append(f"error rate {error_rate:.1%} is above --max-error-rate {cfg.max_error_rate:.1%}; "
                     f"the messages are in the {'grefine_error'} column")
    summary = JobSummary(
        out=out_root, mode=cfg.mode, state=state, exit_code=code, config_hash=fingerprint,
        shards_total=len(shards), shards_run=len(done_now), shards_skipped=skipped,
        shards_failed=report.failures, rows=rows, status=tot["status"], routes=tot["routes"],
        error_rate=error_rate, rows_this_run=rows_run, wall_s=wall, startup_s=report.startup_s,
        items_per_s=rows_run / busy, retries=report.retries, manifest=manifest_path(out_root),
        removed_temporaries=removed, units_run=report.units, units_total=units_total, adopted=adopted,
        notes=notes,
    )
    write_manifest(out_fs, out_root, {
        **base,
        "state": state,
        "exit_code": code,
        "counts": {"rows": rows, "status": tot["status"], "routes": tot["routes"], "error_rate": error_rate,
                   "shards_complete": len(markers), "shards_total": len(shards)},
        "failures": [{"shard": r, "error": m} for r, m in report.failures],
        "run": {"wall_s": round(wall, 3), "startup_s": round(report.startup_s, 3), "rows": rows_run,
                "items_per_s": round(rows_run / busy, 3), "shards_run": len(done_now),
                "shards_skipped": skipped, "retries": report.retries, "workers": report.workers,
                "executor": cfg.executor, "unit_rows": unit_rows, "units_run": report.units,
                "units_total": units_total, "adopted": adopted},
    })
    # 9. The HTML report (read back through OUT's filesystem, local or a store); it never fails the job
    if cfg.write_report:
        summary.notes.append(_write_report(cfg.out))
    return summary


def _without_secrets(cfg: JobConfig) -> dict[str, Any]:
    """The job options as the manifest records them: credentials in URIs (s3://KEY:SECRET@bucket/...)
    masked; the injected seams (engine factory, batch hook) left out."""
    job = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in SEAMS}
    return {**job, "inputs": [mask_secret(u) for u in job.get("inputs", [])], "out": mask_secret(job.get("out"))}


def _record_failed_start(fs: Any, out_root: str, fingerprint: str, rcfg: dict[str, Any], e: BaseException) -> None:
    """state "failed" in the manifest; an OUT holding results of another config keeps that config's
    manifest (a failed start must not lock OUT to a config that produced nothing) with the failure noted."""
    from grefine_curate.pipelines.manifest import has_results

    failure = {"state": "failed", "exit_code": exit_code_for(e), "error": f"{type(e).__name__}: {e}",
               "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        old = read_json(fs, manifest_path(out_root))
        if old is not None and old.get("config_hash") != fingerprint and has_results(fs, out_root):
            write_manifest(fs, out_root, {**{k: v for k, v in old.items() if k not in ("manifest_version", "updated_at")},
                                          "last_failed_start": failure})
        else:
            write_manifest(fs, out_root, {"config_hash": fingerprint, "result_config": rcfg, **failure})
    except OSError:
        pass  # the error itself is what the user must see


def make_executor(cfg: JobConfig):
    """The executor named by the options (executors.py: LocalExecutor, RayExecutor)."""
    from grefine_curate.pipelines.executors import LocalExecutor, RayExecutor

    if cfg.executor_impl is not None:
        return cfg.executor_impl
    if cfg.executor == "local":
        return LocalExecutor()
    return RayExecutor(address=cfg.address, workers=cfg.workers, gpus_per_worker=cfg.gpus_per_worker,
                       max_attempts=cfg.max_attempts, threads_per_worker=cfg.threads_per_worker)


def _write_report(out: str) -> str:
    """OUT/__grefine__/report.html (local or on the store, read back through the same filesystem)."""
    try:
        from grefine_curate.pipelines.report import write_report

        return f"report: {write_report(out)}"
    except Exception as e:  # noqa: BLE001 - the outputs are complete; a report problem is only a note
        return f"report: not written ({type(e).__name__}: {e})"


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for an exception escaping ``run_job`` (for the CLI's error edge)."""
    if isinstance(exc, (ConfigError, InputError)):
        return EXIT_USAGE
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILURE


__all__ = ["JobConfig", "JobSummary", "run_job", "exit_code_for", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE",
           "EXIT_ERROR_RATE", "EXIT_INTERRUPTED"]
