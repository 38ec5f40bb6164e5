"""The processor: one work unit in (rows [start, stop) of a shard), one committed output out: the
shard's output file and marker when the unit is the whole shard, else the unit's part (units.py).

This is the step both executors run (in-process, or inside a Ray actor). Per batch of rows:

    1. read raw rows in input order: the shard's format reads them (formats/: ``read``), or any
       iterator of (raw batch, items) handed to ``process_unit`` (an in-memory reader in tests)
    2. decode images on a CPU thread pool ahead of the model (decode k+1 while the model runs batch k)
       within the unit's pixel budget (pixel_budget.py: two batches of usual-size images, at most two
       images at the pixel limit); a batch of large images goes to the models in chunks that fit it
    3. score: PQ-Map p, P and AQ-Map a, A (paper sec. 3.1-3.2); a null or empty prompt gives PQ only
    4. refine mode: route by (p, a) and run the balanced refiner (paper sec. 3.3) on light/full items
    5. append the rows to the output, written under a temporary name, laid out by the format (a
       WebDataset tar: the sidecar, and in refine mode the mirrored tar through the format's sink)

When every row is written, the footer gets the commit record (records.py), the file is renamed into
place and, for a whole shard, its marker is written (all atomic), so a killed job leaves either a
complete file or an ignorable temporary.

Nothing disappears silently: an item that cannot be decoded or scored becomes a row with status
``error`` and the message. A model failure on a batch falls back to one item at a time, so one bad
item cannot take its batch (or the job) down.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from grefine_curate.curate.errors import GRefineError, ImageError
from grefine_curate.curate.images import decode_image, encode_image, map_to_png
from grefine_curate.curate.results import ScoreResult
from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.commit import ParquetFile, write_atomic
from grefine_curate.pipelines.engines import (  # noqa: F401 (re-exported: the processor's public names)
    Engine,
    EngineSpec,
    ModelEngine,
    RefineRequest,
    RefineResponse,
    build_engine,
)
from grefine_curate.pipelines.formats import get_format
from grefine_curate.pipelines.pixel_budget import PixelBudget, budget_pixels, pixel_chunks
from grefine_curate.pipelines.work import (  # noqa: F401 (re-exported)
    Item,
    ProcessOptions,
    ShardResult,
    ShardTask,
    commit_record,
)


def _decode(item: Item, opts: ProcessOptions) -> Item:
    if item.source_error is not None:
        item.error = item.source_error
        return item
    if not item.needs_pixels:
        return item
    try:
        draft = (opts.draft_size, opts.draft_size) if opts.draft_size else None
        item.image = decode_image(item.raw, name=item.item_id, max_pixels=opts.max_pixels, draft_size=draft)
    except ImageError as e:
        item.error = str(e)
    except Exception as e:  # noqa: BLE001 - a decoder bug must become a row, not a dead shard
        item.error = f"{item.item_id}: cannot decode image ({type(e).__name__}: {e})"
    return item


def _error_text(item_id: str, stage: str, e: BaseException) -> str:
    msg = str(e)
    if isinstance(e, GRefineError) and item_id in msg:
        return msg
    return f"{item_id}: {stage} failed ({type(e).__name__}: {msg})"


def _run_isolated(fn, items: list[Item], stage: str, call) -> None:
    """Run ``call(items)`` on the batch; on a failure retry one item at a time so only bad items error.

    ``call`` returns one result per item; ``fn(item, result)`` stores it.
    """
    if not items:
        return
    try:
        results = call(items)
        assert len(results) == len(items), f"{stage}: {len(results)} results for {len(items)} items"
        for it, r in zip(items, results):
            fn(it, r)
        return
    except Exception as batch_error:  # noqa: BLE001
        if len(items) == 1:
            items[0].error = _error_text(items[0].item_id, stage, batch_error)
            return
    for it in items:
        try:
            (r,) = call([it])
            fn(it, r)
        except Exception as e:  # noqa: BLE001
            it.error = _error_text(it.item_id, stage, e)


def refine_chunks(todo: list[Item], max_pixels: int) -> list[list[Item]]:
    """The items to refine in calls whose full-size outputs stay within one image at the pixel limit
    (``max_pixels``): a batch of small images is one call, a batch at the limit one call per image."""
    sizes = [(it.size[0] * it.size[1]) if it.size else 0 for it in todo]
    return [[todo[i] for i in chunk] for chunk in pixel_chunks(sizes, max_pixels)]


def run_models(items: list[Item], engine: Engine, opts: ProcessOptions, refined=None) -> None:
    """Steps 3-4 for a decoded batch: scores (and routes, seeds, refinement in refine mode), in place.

    Memory: a decoded image is released (``item.image = None``) as soon as nothing reads it: after
    scoring, unless the item is refined; a refined item's image is first reduced to where the
    refiner starts (``engine.refine_input``, when the engine has it). Refinement runs in chunks of
    at most one image at the pixel limit of full-size output (``refine_chunks``), and ``refined(chunk)``
    (the processor encodes there) is called after each, so full-size outputs never pile up."""
    for it in items:
        if it.image is not None:
            it.size = it.image.size
    if opts.mode == "refine":
        for it in items:  # every row gets its seed, error rows included: an int64 column without nulls
            it.seed = engine.item_seed(it.item_id)  # (pandas would read nulls as float64 and round it)
    good = [it for it in items if it.error is None and it.needs_pixels]

    def set_score(it: Item, r: ScoreResult) -> None:
        if it.prior is not None:  # scored again for its maps; the audit's p and a decided its route
            from grefine_curate.pipelines.audit import with_prior

            r = with_prior(r, it.prior)
        it.score = r

    _run_isolated(set_score, good, "scoring", lambda b: engine.score([i.image for i in b], [i.prompt for i in b]))

    def route(it: Item) -> str:
        if opts.routing is not None:
            from grefine_curate.curate.routing import choose_route

            return choose_route(it.score.p, it.score.a, opts.routing)
        return engine.route(it.score.p, it.score.a)

    if opts.mode != "refine":  # score mode: the route a run would take (planned, nothing refined)
        for it in items:
            it.image = None
            if it.error is None and it.score is not None:
                try:
                    it.route = route(it)
                except Exception as e:  # noqa: BLE001
                    it.error = _error_text(it.item_id, "routing", e)
        return
    todo = []
    for it in items:
        if it.error is not None or it.score is None:
            continue
        try:
            if it.route is None:  # set from the audit with --scores
                it.route = route(it)
        except Exception as e:  # noqa: BLE001
            it.error = _error_text(it.item_id, "routing", e)
            continue
        it.p_after, it.a_after = it.score.p, it.score.a
        if it.route != "skip":
            todo.append(it)
    refining = {id(it) for it in todo}
    for it in items:
        if id(it) not in refining:
            it.image = None
    prepare = getattr(engine, "refine_input", None)  # optional (engines.Engine)
    if prepare is not None:
        for it in todo:
            try:
                it.image = prepare(it.image)  # the original is released here
            except Exception as e:  # noqa: BLE001
                it.error = _error_text(it.item_id, "refinement", e)
                it.image = None
        todo = [it for it in todo if it.error is None]

    def set_refined(it: Item, r: RefineResponse) -> None:
        it.refined, it.route, it.p_after, it.a_after = r.image, r.route, r.p_after, r.a_after

    # full-size outputs of one image at the limit per call (no limit, 0: the unit's budget)
    out_pixels = opts.max_pixels if opts.max_pixels > 0 else budget_pixels(0, opts.batch_size)
    for chunk in refine_chunks(todo, out_pixels):
        _run_isolated(
            set_refined, chunk, "refinement",
            lambda b: engine.refine([RefineRequest(i.image, i.prompt, i.score, i.route, i.seed, i.item_id, i.size)
                                     for i in b]),
        )
        for it in chunk:
            it.image = None
        if refined is not None:
            refined(chunk)


def encode_outputs(items: list[Item], fmt, opts: ProcessOptions) -> None:
    """Step 4b: encode refined images (in the format the output layout keeps: a folder's or a tar
    member's own, else --image-format) and maps item by item, so one that cannot be encoded (say,
    wider than WebP allows) becomes an error row instead of failing the shard. The refined image is
    released once encoded; an item already encoded is not encoded again."""
    for it in items:
        if it.error is not None or it.score is None:
            continue
        try:
            if it.refined is not None:
                enc = fmt.encoding(it, opts)
                refined, it.refined = it.refined, None  # released once encoded
                if enc == "JPEG" and refined.mode != "RGB":
                    refined = refined.convert("RGB")
                it.encoded = encode_image(refined, enc)
                it.encoded_format = enc
                del refined
            if opts.save_maps and it.needs_pixels and it.pq_png is None:  # else the audit's maps are there
                it.pq_png = map_png(it.score.pq.P)
                it.aq_png = map_png(it.score.aq.A) if it.score.aq is not None else None
        except Exception as e:  # noqa: BLE001 - one bad item never fails its shard
            it.error = _error_text(it.item_id, "encoding the output", e)
            it.refined = it.encoded = None


# ---------------------------------------------------------------------------------------------
# Output columns


def map_png(m: np.ndarray | None) -> bytes | None:
    """A (H, W) map in [0, 1] stored compactly: 64x64 8-bit grey PNG (never full-size floats)."""
    if m is None:
        return None
    small = Image.fromarray(np.asarray(m, dtype=np.float32), mode="F").resize((C.MAP_SIZE, C.MAP_SIZE), Image.BILINEAR)
    return map_to_png(np.asarray(small))


def _score_columns(items: Sequence[Item], opts: ProcessOptions, refine: bool) -> dict[str, pa.Array]:
    ok = [it.error is None and it.score is not None for it in items]
    cols: dict[str, pa.Array] = {
        C.STATUS: pa.array([C.STATUS_OK if k else C.STATUS_ERROR for k in ok], pa.string()),
        C.ERROR: pa.array([None if k else (it.error or "unknown error") for it, k in zip(items, ok)], pa.string()),
    }
    cols[C.ROUTE] = pa.array([it.route if k else None for it, k in zip(items, ok)], pa.string())
    if not refine:  # score mode: the route is what a run would do with the thresholds in force
        cols[C.ROUTE_PLANNED] = pa.array([True if k else None for k in ok], pa.bool_())
    cols[C.PQ_SCORE] = pa.array([float(it.score.p) if k else None for it, k in zip(items, ok)], pa.float32())
    cols[C.AQ_SCORE] = pa.array(
        [float(it.score.a) if k and it.score.a is not None else None for it, k in zip(items, ok)], pa.float32()
    )
    if refine:
        cols[C.PQ_SCORE_AFTER] = pa.array([it.p_after if k else None for it, k in zip(items, ok)], pa.float32())
        cols[C.AQ_SCORE_AFTER] = pa.array([it.a_after if k else None for it, k in zip(items, ok)], pa.float32())
    cols[C.UNMATCHED] = pa.array(
        [(list(it.prior.unmatched) if it.prior is not None else list(it.score.aq.unmatched))
         if k and it.score.aq is not None else ([] if k else None)
         for it, k in zip(items, ok)],
        pa.list_(pa.string()),
    )
    if refine:
        cols[C.SEED] = pa.array([it.seed for it in items], pa.int64())
    if opts.save_maps:
        cols[C.PQ_MAP] = pa.array([it.pq_png if k else None for it, k in zip(items, ok)], pa.binary())
        cols[C.AQ_MAP] = pa.array([it.aq_png if k else None for it, k in zip(items, ok)], pa.binary())
    return cols


def _score_fields(opts: ProcessOptions, refine: bool) -> list[pa.Field]:
    f = [pa.field(C.STATUS, pa.string()), pa.field(C.ERROR, pa.string()), pa.field(C.ROUTE, pa.string())]
    if not refine:
        f.append(pa.field(C.ROUTE_PLANNED, pa.bool_()))
    f += [pa.field(C.PQ_SCORE, pa.float32()), pa.field(C.AQ_SCORE, pa.float32())]
    if refine:
        f += [pa.field(C.PQ_SCORE_AFTER, pa.float32()), pa.field(C.AQ_SCORE_AFTER, pa.float32())]
    f.append(pa.field(C.UNMATCHED, pa.list_(pa.string())))
    if refine:
        f.append(pa.field(C.SEED, pa.int64()))
    if opts.save_maps:
        f += [pa.field(C.PQ_MAP, pa.binary()), pa.field(C.AQ_MAP, pa.binary())]
    return f


def output_schema(task: ShardTask, input_schema: pa.Schema | None, opts: ProcessOptions) -> pa.Schema:
    """The output schema of a unit: fixed before the first row is written (the format lays it out)."""
    return get_format(task.shard.format).output_schema(task.shard, input_schema, _score_fields(opts, opts.mode == "refine"), opts)


def _header_pixels(item: Item, opts: ProcessOptions) -> int:
    """Pixels the item will hold once decoded, from its header (a JPEG drafted for scoring: its reduced
    size); 0 when it will not be decoded (no pixels needed, over the limit, or a header that cannot
    be read: the decoder says why)."""
    from grefine_curate.curate.images import pixel_counts

    if item.raw is None or not item.needs_pixels or item.source_error is not None:
        return 0
    draft = (opts.draft_size, opts.draft_size) if opts.draft_size else None
    try:
        full, decoded = pixel_counts(item.raw, draft)
    except Exception:  # noqa: BLE001 - the decoder says why, item by item
        return 0
    return 0 if opts.max_pixels and full > opts.max_pixels else decoded  # over the limit: refused from its header


def _decode_within(item: Item, opts: ProcessOptions, budget: PixelBudget, ticket: int, pixels: int) -> int:
    """Decode once the budget has room (in input order); returns the pixels the item now holds."""
    if not budget.take(ticket, pixels):
        item.error = item.error or f"{item.item_id}: not decoded (the work unit ended first)"
        return 0
    _decode(item, opts)
    if item.image is None and pixels:
        budget.give(pixels)
        return 0
    return pixels


def _after_batch(batch_index: int, opts: ProcessOptions) -> None:
    if opts.batch_hook is not None:  # injected (faults.py: delays, a dying worker); picklable, so it reaches Ray actors
        opts.batch_hook(batch_index)


# ---------------------------------------------------------------------------------------------
# The processor


def process_shard(task: ShardTask, engine: Engine, opts: ProcessOptions,
                  node_id: str | None = None) -> Iterator[int | ShardResult]:
    """Process one work unit; yields the number of items finished after each batch, then the ShardResult.

    A generator so that both executors can report progress per batch (a Ray actor streams it).
    ``node_id`` (the Ray node running it) is recorded in the result and the commit record.
    """
    fmt = get_format(task.shard.format)
    in_schema, batches = fmt.read(task, opts)
    yield from process_unit(task, in_schema, batches, engine, opts, node_id)


def process_unit(task: ShardTask, in_schema: pa.Schema | None, batches, engine: Engine, opts: ProcessOptions,
                 node_id: str | None = None) -> Iterator[int | ShardResult]:
    """The step itself, for any reader: ``batches`` yields (raw batch, items) in input order (a format's
    ``read``, or an in-memory list in tests); rows go to the unit's Parquet output and the format's sink."""
    t0 = time.perf_counter()
    shard = task.shard
    fmt = get_format(shard.format)
    # 1. Open the output (temporary names)
    schema = output_schema(task, in_schema, opts)
    writer = ParquetFile(task.out_fs, task.output_path, schema)
    beside = None
    budget = None
    status: Counter[str] = Counter()
    routes: Counter[str] = Counter()
    rows = 0
    prior = None
    if opts.scores_uri is not None:  # refine: only what it refines is decoded; score: nothing is scored again
        from grefine_curate.pipelines.audit import PriorRows

        prior = PriorRows(opts.scores_uri, shard.rel, opts.scores_maps, start=task.start)
        routing = opts.routing
        assert routing is not None, "--scores needs the thresholds in force (opts.routing)"
    pool = ThreadPoolExecutor(max_workers=max(1, opts.decode_threads), thread_name_prefix="grefine-decode")
    try:
        beside = fmt.open_sink(task, opts)

        # 2. Decode ahead of the model, within the unit's pixel budget (pixel_budget.py): each item
        #    takes its header's pixels before it is decoded and gives them back once its full-size
        #    image is dropped, so small images decode a batch ahead and large ones wait for room.
        budget = PixelBudget(opts.pixel_budget or budget_pixels(opts.max_pixels, opts.batch_size))

        def submit(entry):
            raw_batch, items = entry
            if prior is not None:  # audit scores and routes first: skip items are never decoded
                prior.attach(items, routing, refine=opts.mode == "refine")
            sizes = [_header_pixels(it, opts) for it in items]
            futs = [pool.submit(_decode_within, it, opts, budget, budget.ticket(), n) for it, n in zip(items, sizes)]
            return raw_batch, items, sizes, futs

        it_batches = iter(batches)
        nxt = next(it_batches, None)
        pending = submit(nxt) if nxt is not None else None
        k = 0
        while pending is not None:
            raw_batch, items, sizes, futs = pending
            nxt = next(it_batches, None)
            pending = submit(nxt) if nxt is not None else None
            # 3-4. Models, a chunk of the batch at a time: the whole batch unless its images are large
            for chunk in pixel_chunks(sizes, budget.capacity):
                held = sum(futs[i].result() for i in chunk)
                part = [items[i] for i in chunk]
                run_models(part, engine, opts, refined=lambda done: encode_outputs(done, fmt, opts))
                encode_outputs(part, fmt, opts)
                for it in part:
                    it.image = None  # run_models released it already; never held past its chunk
                budget.give(held)
            # 5. Output rows (and what the format keeps beside them)
            out = fmt.output_batch(task, raw_batch, items, schema, _score_columns(items, opts, opts.mode == "refine"), opts)
            writer.write(out)
            beside.write(items, out)
            for item in items:
                item.image = item.refined = item.encoded = None  # free pixels before the next batch
                ok = item.error is None and item.score is not None
                status[C.STATUS_OK if ok else C.STATUS_ERROR] += 1
                if ok and item.route:
                    routes[item.route] += 1
            rows += len(items)
            _after_batch(k, opts)
            k += 1
            yield len(items)
        # 6. Commit: the files beside first (the record vouches for them by name and size), then the
        #    footer with the commit record and the rename; a whole-shard unit also writes the marker
        result = ShardResult(rel=shard.rel, rows=rows, status=dict(status), routes=dict(routes),
                             seconds=round(time.perf_counter() - t0, 3), output=task.output_path,
                             start=task.start, stop=task.start + rows, part=task.part, node_id=node_id,
                             attempt=task.attempt)
        record = commit_record(task, result, opts)
        companions = beside.commit()
        if companions:
            result.companions = record["companions"] = companions
        writer.commit(record)
    except BaseException:
        writer.abort()
        if beside is not None:
            beside.abort()
        raise
    finally:
        if budget is not None:
            budget.close()  # decodings still waiting for room end now
        pool.shutdown(wait=True, cancel_futures=True)
        if prior is not None:
            prior.close()
    if not task.part:
        write_atomic(task.out_fs, task.marker_path, json.dumps({**record, "finished_at": time.time()}, indent=1).encode())
    yield result


__all__ = [
    "Engine", "EngineSpec", "Item", "ModelEngine", "build_engine", "ProcessOptions", "RefineRequest", "RefineResponse",
    "ShardResult", "ShardTask", "encode_outputs", "map_png", "output_schema", "process_shard", "process_unit",
    "refine_chunks", "run_models",
]
