"""The processor: one work unit in (rows [start, stop) of a shard), one committed output out: the
shard's output file and marker when the unit is the whole shard, else the unit's part (units.py).

This is the step both executors run (in-process, or inside a Ray actor). Per batch of rows:

    1. read raw rows (Parquet row batches of the unit's row groups / folder files / tar samples), in
       input order
    2. decode images on a CPU thread pool, one batch ahead of the model (decode k+1 while the model
       runs batch k)
    3. score: PQ-Map p, P and AQ-Map a, A (paper sec. 3.1-3.2); a null or empty prompt gives PQ only
    4. refine mode: route by (p, a) and run the balanced refiner (paper sec. 3.3) on light/full items
    5. append the rows to the output, written under a temporary name (a WebDataset tar: the sidecar,
       and in refine mode the mirrored tar, sample by sample)

When every row is written, the footer gets the commit record (records.py), the file is renamed into
place and, for a whole shard, its marker is written (all atomic), so a killed job leaves either a
complete file or an ignorable temporary.

Nothing disappears silently: an item that cannot be decoded or scored becomes a row with status
``error`` and the message. A model failure on a batch falls back to one item at a time, so one bad
item cannot take its batch (or the job) down.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from grefine_curate.curate.config import Preset, RoutingConfig
from grefine_curate.curate.errors import GRefineError, ImageError
from grefine_curate.curate.images import decode_image, encode_image, map_to_png
from grefine_curate.curate.results import ScoreResult
from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.sinks import EXTENSION_FORMATS, ShardWriter, marker_path, write_atomic
from grefine_curate.pipelines.sources import Shard, join, safe_relpath
from grefine_curate.pipelines.tar_shards import TAR_IMAGE_EXTENSIONS, TarSink, iter_samples, sample_prompt, split_member
from grefine_curate.pipelines.units import part_path


@dataclass(frozen=True)
class ProcessOptions:
    """Everything the shard processor needs besides the shard and the models (picklable, for Ray)."""

    mode: str = "refine"  # "refine" | "score"
    batch_size: int = 8  # images per model call
    save_maps: bool = False  # store P and A as 64x64 8-bit PNG in pq_map / aq_map
    keep_images: bool = False  # score mode: keep the image bytes in the output
    input_columns: bool = True  # score mode, Parquet input: keep the input's other columns (joins, licences)
    image_format: str = "PNG"  # encoding of refined images in Parquet outputs ("PNG" | "JPEG" | "WEBP")
    max_pixels: int = 8192 * 8192  # images above this are error rows, refused before decoding
    draft_size: int | None = None  # score mode: JPEGs decoded DCT-scaled to at least this side (faster)
    decode_threads: int = 2  # CPU threads decoding images beside the model
    seed: int = 0  # global seed; an item's seed = item_seed(seed, item id)
    fingerprint: str = ""  # job config hash; stored in the marker, resume compares it
    routing: RoutingConfig | None = None  # thresholds in force (None: the engine's preset); the job always sets it
    scores_uri: str | None = None  # refine mode: take p, a, unmatched phrases from this audit (pipelines/audit.py)
    scores_maps: bool = False  # the audit saved maps (copied to rows that are not scored again)


@dataclass(frozen=True)
class ShardTask:
    """One work unit: rows [start, stop) of a shard (see units.py).

    ``part`` False: the unit is the whole shard and writes the output file itself (and its marker).
    ``part`` True: the unit writes a committed part under OUT/_grefine/units/; the driver
    concatenates the parts into the output file when the last one lands.
    """

    shard: Shard
    out_fs: pafs.FileSystem
    out_root: str
    row_cap: int | None = None  # --limit: process only the first rows of this shard
    attempt: int = 1
    start: int = 0  # first row (input order) of this unit
    stop: int | None = None  # one past its last row (None: the shard's end, or row_cap)
    row_groups: tuple[int, ...] | None = None  # parquet: the row groups holding [start, stop) (None: all)
    part: bool = False

    @property
    def end(self) -> int:
        cap = self.shard.num_rows if self.row_cap is None else min(self.row_cap, self.shard.num_rows)
        return cap if self.stop is None else min(self.stop, cap)

    @property
    def rows(self) -> int:
        return max(0, self.end - self.start)

    @property
    def output_path(self) -> str:
        if self.part:
            return part_path(self.out_root, self.shard.rel, self.start, self.end)
        return join(self.out_root, self.shard.record_rel)

    @property
    def marker_path(self) -> str:
        return marker_path(self.out_root, self.shard.rel)


@dataclass
class ShardResult:
    rel: str
    rows: int
    status: dict[str, int]  # "ok"/"error" -> count
    routes: dict[str, int]  # "skip"/"light"/"full"/"reverted" -> count (refine mode)
    seconds: float
    output: str
    start: int = 0  # the unit's row range [start, stop)
    stop: int = 0
    part: bool = False  # a unit's part (the shard's output comes when its last unit lands)
    node_id: str | None = None  # Ray node that processed it (None: in-process)
    attempt: int = 1
    companions: dict[str, int] | None = None  # files it vouches for beside its output (a tar unit's part tar)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------
# The model engine seen by the processor


@dataclass
class RefineRequest:
    image: Image.Image
    prompt: str | None
    score: ScoreResult
    route: str  # "light" | "full" (skip never reaches the refiner)
    seed: int
    item_id: str


@dataclass
class RefineResponse:
    image: Image.Image | None  # None: keep the original (route "skip"/"reverted")
    route: str  # final route; "reverted" when the no-regression guard kept the original
    p_after: float | None
    a_after: float | None


class Engine(Protocol):
    """What the processor needs from the models: score, route, refine, seed."""

    def score(self, images: list[Image.Image], prompts: list[str | None]) -> list[ScoreResult]: ...

    def route(self, p: float, a: float | None) -> str: ...

    def refine(self, requests: list[RefineRequest]) -> list[RefineResponse]: ...

    def item_seed(self, item_id: str) -> int: ...


@dataclass(frozen=True)
class EngineSpec:
    """How to build the models (picklable: Ray actors build their own copy)."""

    preset: Preset
    mode: str  # "refine" loads the refiner too; "score" only the scorer
    models_dir: str | None = None

    def key(self) -> tuple[str, str | None]:
        # One engine serves both modes and any thresholds (the processor routes with opts.routing), so
        # the two passes of quantile routing load the models once.
        import dataclasses

        return (dataclasses.replace(self.preset, routing=RoutingConfig()).hash(), self.models_dir)


class ModelEngine:
    """The real models: QualityScorer (PQ-Map + AQ-Map), routing, BalancedRefiner."""

    def __init__(self, spec: EngineSpec):
        from grefine_curate.curate.scorer import QualityScorer

        self.preset = spec.preset
        self.models_dir = spec.models_dir
        self.scorer = QualityScorer(spec.preset, models_dir=spec.models_dir)
        self.refiner = None
        self.ensure_mode(spec.mode)

    def ensure_mode(self, mode: str) -> None:
        """A score engine gains the refiner when a refine job reuses it (same preset, same process)."""
        if mode == "refine" and self.refiner is None:
            from grefine_curate.curate.refiner import BalancedRefiner

            self.refiner = BalancedRefiner(self.preset.refiner, self.preset.routing, rescore=self.scorer.rescore,
                                           models_dir=self.models_dir)

    def score(self, images: list[Image.Image], prompts: list[str | None]) -> list[ScoreResult]:
        return self.scorer.score(images, prompts)

    def route(self, p: float, a: float | None) -> str:
        from grefine_curate.curate.routing import choose_route

        return choose_route(p, a, self.preset.routing)

    def item_seed(self, item_id: str) -> int:
        from grefine_curate.curate.refiner import item_seed

        return item_seed(self.preset.seed, item_id)

    def refine(self, requests: list[RefineRequest]) -> list[RefineResponse]:
        from grefine_curate.curate.refiner import RefineItem

        items = []
        for r in requests:
            aq = r.score.aq
            # Stage 1 gets AQ's emphasised prompt (eq. 7); the guard re-scores with the plain one.
            items.append(RefineItem(
                image=r.image, prompt=(aq.emphasised_prompt or r.prompt) if aq is not None else r.prompt,
                p=r.score.p, a=r.score.a, P=r.score.pq.P, A=None if aq is None else aq.A, seed=r.seed,
                route=r.route, score_prompt=r.prompt,
            ))
        out = []
        for o in self.refiner.refine(items):
            changed = o.route in ("light", "full")
            out.append(RefineResponse(image=o.image if changed else None, route=o.route,
                                      p_after=o.p_after, a_after=o.a_after))
        return out


def build_engine(spec: EngineSpec) -> Engine:
    if os.environ.get("GREFINE_TEST_NO_MODELS"):  # test hook: a run that must not load models fails loudly
        from grefine_curate.curate.errors import ModelUnavailableError

        raise ModelUnavailableError("models were about to load although GREFINE_TEST_NO_MODELS is set")
    return ModelEngine(spec)


class LazyEngine:
    """Builds the models on first use: a run reusing an audit that refines nothing never loads them."""

    def __init__(self, build, seed: int):
        self._build, self._engine, self.seed = build, None, seed

    def get(self) -> Engine:
        if self._engine is None:
            self._engine = self._build()
        return self._engine

    def score(self, images, prompts):
        return self.get().score(images, prompts)

    def route(self, p, a):
        return self.get().route(p, a)

    def refine(self, requests):
        return self.get().refine(requests)

    def item_seed(self, item_id: str) -> int:
        from grefine_curate.curate.refiner import item_seed

        return item_seed(self.seed, item_id)


# ---------------------------------------------------------------------------------------------
# Items


@dataclass
class Item:
    """One input row on its way through the processor."""

    item_id: str
    prompt: str | None
    raw: bytes | None = None  # encoded image bytes (None when absent)
    source_error: str | None = None  # the bytes could not even be read
    image: Image.Image | None = None
    error: str | None = None
    score: ScoreResult | None = None
    route: str | None = None
    seed: int | None = None
    refined: Image.Image | None = None
    p_after: float | None = None
    a_after: float | None = None
    encoded: bytes | None = None  # the refined image, encoded for the output
    pq_png: bytes | None = None  # --save-maps: 64x64 P
    aq_png: bytes | None = None  # --save-maps: 64x64 A
    sample: Any = None  # WebDataset input: the tar sample (members, in order)
    meta: dict[str, Any] | None = None  # WebDataset input: the sample's KEY.json object
    prior: Any = None  # --scores: the audit's scores of this item (pipelines.audit.Prior)
    needs_pixels: bool = True  # False: routed skip from the audit (or its error): never decoded


def _clean_prompt(p: Any) -> str | None:
    if p is None:
        return None
    s = str(p).strip()
    return s or None


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


def run_models(items: list[Item], engine: Engine, opts: ProcessOptions) -> None:
    """Steps 3-4 for a decoded batch: scores (and routes, seeds, refinement in refine mode), in place."""
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

    def set_refined(it: Item, r: RefineResponse) -> None:
        it.refined, it.route, it.p_after, it.a_after = r.image, r.route, r.p_after, r.a_after

    _run_isolated(
        set_refined, todo, "refinement",
        lambda b: engine.refine([RefineRequest(i.image, i.prompt, i.score, i.route, i.seed, i.item_id) for i in b]),
    )


def encode_outputs(items: list[Item], kind: str, opts: ProcessOptions) -> None:
    """Step 4b: encode refined images and maps item by item, so one that cannot be encoded (say, wider
    than WebP allows) becomes an error row instead of failing the shard."""
    for it in items:
        if it.error is not None or it.score is None:
            continue
        try:
            if it.refined is not None:
                fmt = opts.image_format
                if kind == "folder":  # a folder output keeps each file's own format (and path)
                    fmt = EXTENSION_FORMATS.get(posixpath.splitext(it.item_id)[1].lower(), opts.image_format)
                elif kind == "tar":  # a tar member keeps its name, so its format follows the extension
                    ext = split_member(it.sample.image.info.name)[1]
                    fmt = EXTENSION_FORMATS.get(f".{ext}", opts.image_format)
                it.encoded = encode_image(it.refined if fmt != "JPEG" else it.refined.convert("RGB"), fmt)
            if opts.save_maps and it.needs_pixels:  # else the audit's maps are already there
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


def output_schema(shard: Shard, input_schema: pa.Schema | None, opts: ProcessOptions) -> pa.Schema:
    """The output schema of a shard: fixed before the first row is written."""
    refine = opts.mode == "refine"
    added = _score_fields(opts, refine)
    if shard.kind == "parquet" and refine:
        names = {f.name for f in added}
        kept = [f for f in input_schema if f.name not in names]  # a re-run over our own output replaces them
        return pa.schema(kept + added, metadata=_hf_metadata(input_schema.metadata, kept + added, names))
    if shard.kind == "tar":  # the sidecar: one row per sample, by key (img2dataset's column name)
        return pa.schema([pa.field(C.KEY, pa.string()), pa.field(C.PROMPT, pa.string())] + added)
    head = [pa.field(C.ID, pa.string())]
    if shard.kind == "folder":
        head.append(pa.field(C.SOURCE, pa.string()))
    head.append(pa.field(C.PROMPT, pa.string()))
    if shard.kind != "parquet":
        return pa.schema(head + added)
    taken = {f.name for f in head + added}
    head += [f for f in input_schema if f.name not in taken and (
        f.name == shard.image_column and opts.keep_images or f.name != shard.image_column and opts.input_columns)]
    return pa.schema(head + added, metadata=_hf_metadata(input_schema.metadata, head + added, taken))


def _hf_feature(t: pa.DataType) -> dict[str, Any]:
    if pa.types.is_list(t):
        return {"feature": _hf_feature(t.value_type), "_type": "Sequence"}
    dtype = {pa.string(): "string", pa.float32(): "float32", pa.int64(): "int64", pa.binary(): "binary",
             pa.bool_(): "bool"}[t]
    return {"dtype": dtype, "_type": "Value"}


def _hf_metadata(meta: dict[bytes, bytes] | None, fields: list[pa.Field], ours: set[str]) -> dict[bytes, bytes] | None:
    """The input's schema metadata for an output with these ``fields``, of which ``ours`` are added by us.

    Hugging Face datasets store their features there (an ``Image`` is only an image through them)
    and refuse a table whose columns differ from them: the input's features are kept for the columns
    the output keeps, our added columns are declared, dropped ones removed (unknown layouts are left
    alone). Input columns the input's features did not declare stay undeclared, as in the input.
    """
    if not meta or b"huggingface" not in meta:
        return meta
    try:
        info = json.loads(meta[b"huggingface"])
        feats = info["info"]["features"]
        new = {}
        for f in fields:
            if f.name in feats and f.name not in ours:
                new[f.name] = feats[f.name]
            elif f.name in ours:
                new[f.name] = _hf_feature(f.type)
        info["info"]["features"] = new
    except (ValueError, KeyError, TypeError, AttributeError):
        return meta
    return {**meta, b"huggingface": json.dumps(info).encode()}


def _final_bytes(it: Item) -> bytes | None:
    """The image a row ends with: the refined image as encoded in step 4b, else None (original bytes kept)."""
    return None if it.error is not None else it.encoded


def _replace_image_column(arr: pa.Array, items: Sequence[Item], is_struct: bool) -> pa.Array:
    new = [_final_bytes(it) for it in items]
    if all(b is None for b in new):
        return arr  # nothing refined: the original column, zero-copy
    if is_struct:
        children = arr.flatten()  # child arrays with the parent's offset applied (sliced batches)
        k = arr.type.get_field_index("bytes")
        old = children[k].to_pylist()
        children[k] = pa.array([n if n is not None else o for n, o in zip(new, old)], type=children[k].type)
        return pa.StructArray.from_arrays(children, fields=list(arr.type), mask=arr.is_null())
    old = arr.to_pylist()
    return pa.array([n if n is not None else o for n, o in zip(new, old)], type=arr.type)


# ---------------------------------------------------------------------------------------------
# Reading


def _parquet_batches(task: ShardTask, batch_size: int) -> tuple[pa.Schema, Iterator[tuple[pa.RecordBatch, list[Item]]]]:
    shard = task.shard
    f = shard.fs.open_input_file(shard.path)
    pf = pq.ParquetFile(f)
    schema = pf.schema_arrow
    shard_dir = posixpath.dirname(shard.path)
    groups = list(task.row_groups) if task.row_groups is not None else None

    def rows() -> Iterator[tuple[pa.RecordBatch, list[Item]]]:
        start, end = task.start, task.end  # the unit's row groups begin at row `start`
        try:
            for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups):
                if start >= end:
                    break
                if start + batch.num_rows > end:
                    batch = batch.slice(0, end - start)
                yield batch, _parquet_items(shard, batch, start, shard_dir)
                start += batch.num_rows
        finally:
            f.close()

    return schema, rows()


def _parquet_items(shard: Shard, batch: pa.RecordBatch, start: int, shard_dir: str) -> list[Item]:
    img = batch.column(shard.image_column)
    n = batch.num_rows
    prompts = batch.column(shard.prompt_column).to_pylist() if shard.prompt_column else [None] * n
    if shard.id_column:
        ids = ["" if v is None else str(v) for v in batch.column(shard.id_column).to_pylist()]
        ids = [v or f"{shard.rel}#{start + i}" for i, v in enumerate(ids)]
    else:
        ids = [f"{shard.rel}#{start + i}" for i in range(n)]
    items = []
    if shard.image_is_struct:
        children = img.flatten()  # offset-aware, unlike .field()
        raws = children[img.type.get_field_index("bytes")].to_pylist()
        k = img.type.get_field_index("path")
        paths = children[k].to_pylist() if k >= 0 else [None] * n
        valid = img.is_valid().to_pylist()
    else:
        raws, paths, valid = img.to_pylist(), [None] * n, [True] * n
    for i in range(n):
        it = Item(item_id=ids[i], prompt=_clean_prompt(prompts[i]))
        raw = raws[i] if valid[i] else None
        if raw is None and paths[i]:
            # A Hugging Face image stored by path only: read it next to the shard (or absolute).
            p = paths[i] if paths[i].startswith("/") or "://" in paths[i] else join(shard_dir, paths[i])
            try:
                with shard.fs.open_input_stream(p) as fh:
                    raw = fh.read()
            except (OSError, pa.ArrowInvalid) as e:
                it.source_error = f"{it.item_id}: image bytes are null and its path {paths[i]!r} cannot be read ({e})"
        it.raw = raw
        items.append(it)
    return items


def _folder_batches(task: ShardTask, batch_size: int) -> Iterator[tuple[None, list[Item]]]:
    shard = task.shard
    entries = shard.items[task.start : task.end]
    for k in range(0, len(entries), batch_size):
        items = []
        for e in entries[k : k + batch_size]:
            it = Item(item_id=e.rel, prompt=_clean_prompt(e.prompt))
            try:
                with shard.fs.open_input_stream(join(shard.path, e.rel)) as fh:
                    it.raw = fh.read()
            except (OSError, pa.ArrowInvalid) as err:
                it.source_error = f"{e.rel}: cannot read file ({err})"
            items.append(it)
        yield None, items


def _tar_batches(task: ShardTask, batch_size: int) -> Iterator[tuple[None, list[Item]]]:
    shard = task.shard
    batch: list[Item] = []
    # The last unit reads to the tar's end (or --limit), not to the header count taken at discovery,
    # so that no sample can be left out if the two passes ever disagree.
    last = task.end >= shard.num_rows
    stop = task.row_cap if last else task.end
    offset = shard.tar_offsets[task.start] if task.start else 0
    for sample in iter_samples(shard.fs, shard.path, stop=stop, start=task.start, offset=offset):
        if sample.index < task.start:
            continue
        prompt, meta, json_error = sample_prompt(sample)
        it = Item(item_id=sample.key, prompt=_clean_prompt(prompt), sample=sample, meta=meta)
        image = sample.image
        if sample.error is not None:
            it.source_error = sample.error
        elif image is None:
            names = ", ".join(m.info.name for m in sample.members)
            it.source_error = (f"{sample.key}: no image member (.{', .'.join(TAR_IMAGE_EXTENSIONS)}) "
                               f"among {names}")
        elif json_error is not None:
            it.source_error = json_error
        else:
            it.raw = image.data
        batch.append(it)
        if len(batch) >= batch_size:
            yield None, batch
            batch = []
    if batch:
        yield None, batch


def _json_fields(out: pa.RecordBatch) -> list[dict[str, Any]]:
    """The added columns of each row as KEY.json fields (maps are binary: they stay in the sidecar)."""
    names = [n for n in out.schema.names if n not in (C.KEY, C.PROMPT, C.PQ_MAP, C.AQ_MAP)]
    return out.select(names).to_pylist()


# ---------------------------------------------------------------------------------------------
# Test hooks (env vars; used by the fault tests only)


def _test_hooks(batch_index: int) -> None:
    delay = os.environ.get("GREFINE_TEST_BATCH_DELAY")
    if delay:
        time.sleep(float(delay))
    sentinel = os.environ.get("GREFINE_TEST_DIE_ONCE")
    if sentinel and batch_index == 1 and not os.path.exists(sentinel):
        # Simulates a worker process dying mid-shard (a partial temporary file is left behind).
        with open(sentinel, "w") as f:
            f.write(str(os.getpid()))
        os._exit(17)


# ---------------------------------------------------------------------------------------------
# The processor


def process_shard(task: ShardTask, engine: Engine, opts: ProcessOptions,
                  node_id: str | None = None) -> Iterator[int | ShardResult]:
    """Process one work unit; yields the number of items finished after each batch, then the ShardResult.

    A generator so that both executors can report progress per batch (a Ray actor streams it).
    ``node_id`` (the Ray node running it) is recorded in the result and the commit record.
    """
    t0 = time.perf_counter()
    shard = task.shard
    # 1. Open the input and the output (temporary name)
    if shard.kind == "parquet":
        in_schema, batches = _parquet_batches(task, opts.batch_size)
    elif shard.kind == "tar":
        in_schema, batches = None, _tar_batches(task, opts.batch_size)
    else:
        in_schema, batches = None, _folder_batches(task, opts.batch_size)
    schema = output_schema(shard, in_schema, opts)
    writer = ShardWriter(task.out_fs, task.output_path, schema)
    tar_out = None
    if shard.kind == "tar" and opts.mode == "refine":  # score mode writes only the sidecar
        # a whole tar writes the mirrored tar; a unit writes a part tar beside its part sidecar
        tar_path = task.output_path[: -len(".parquet")] + ".tar" if task.part else join(task.out_root, shard.rel)
        tar_out = TarSink(task.out_fs, tar_path)
    status: Counter[str] = Counter()
    routes: Counter[str] = Counter()
    rows = 0
    prior = None
    if opts.scores_uri is not None and opts.mode == "refine":
        from grefine_curate.pipelines.audit import PriorRows

        prior = PriorRows(opts.scores_uri, shard.record_rel, opts.scores_maps, start=task.start)
        routing = opts.routing
        assert routing is not None, "--scores needs the thresholds in force (opts.routing)"
    pool = ThreadPoolExecutor(max_workers=max(1, opts.decode_threads), thread_name_prefix="grefine-decode")
    try:
        # 2. Decode one batch ahead of the model
        def submit(entry):
            raw_batch, items = entry
            if prior is not None:  # audit scores and routes first: skip items are never decoded
                prior.attach(items, routing, refine=True)
            return raw_batch, items, [pool.submit(_decode, it, opts) for it in items]

        it_batches = iter(batches)
        nxt = next(it_batches, None)
        pending = submit(nxt) if nxt is not None else None
        k = 0
        while pending is not None:
            raw_batch, items, futs = pending
            nxt = next(it_batches, None)
            pending = submit(nxt) if nxt is not None else None
            for fu in futs:
                fu.result()
            # 3-4. Models
            run_models(items, engine, opts)
            encode_outputs(items, shard.kind, opts)
            # 5. Output rows
            out = _output_batch(task, raw_batch, items, schema, opts)
            writer.write(out)
            if tar_out is not None:
                for it, fields in zip(items, _json_fields(out)):
                    ok = it.error is None and it.score is not None
                    tar_out.write(it.sample, it.encoded if ok else None, fields, it.meta)
            for item in items:
                item.image = item.refined = item.encoded = None  # free pixels before the next batch
            for item in items:
                ok = item.error is None and item.score is not None
                status[C.STATUS_OK if ok else C.STATUS_ERROR] += 1
                if ok and item.route:
                    routes[item.route] += 1
            rows += len(items)
            _test_hooks(k)
            k += 1
            yield len(items)
        # 6. Commit: the footer carries the commit record (records.py), then the rename; a whole-shard
        #    unit also writes the shard's marker (a part's marker is its footer: the driver assembles)
        result = ShardResult(rel=shard.rel, rows=rows, status=dict(status), routes=dict(routes),
                             seconds=round(time.perf_counter() - t0, 3), output=task.output_path,
                             start=task.start, stop=task.start + rows, part=task.part, node_id=node_id,
                             attempt=task.attempt)
        record = commit_record(task, result, opts)
        if tar_out is not None:  # the tar first: the sidecar's record vouches for it (name and size)
            result.companions = {tar_path[len(task.out_root.rstrip("/")) + 1 :]: tar_out.commit()}
            record["companions"] = result.companions
        writer.commit(record)
    except BaseException:
        writer.abort()
        if tar_out is not None:
            tar_out.abort()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if prior is not None:
            prior.close()
    if not task.part:
        write_atomic(task.out_fs, task.marker_path, json.dumps({**record, "finished_at": time.time()}, indent=1).encode())
    yield result


def commit_record(task: ShardTask, result: ShardResult, opts: ProcessOptions) -> dict[str, Any]:
    """What an output file (or a unit's part) records about itself: resume compares these fields."""
    return {
        **result.to_json(),
        "input": task.shard.path,
        "source_key": task.shard.source_key,
        "fingerprint": opts.fingerprint,
        "row_cap": task.row_cap,
        "units": [] if task.part else [unit_summary(result)],
    }


def unit_summary(res: ShardResult) -> dict[str, Any]:
    """One unit as the shard marker lists it (which node did which rows, in how long)."""
    return {"start": res.start, "stop": res.stop, "rows": res.rows, "node_id": res.node_id,
            "attempt": res.attempt, "seconds": res.seconds}


def _output_batch(task: ShardTask, raw_batch: pa.RecordBatch | None, items: list[Item], schema: pa.Schema,
                  opts: ProcessOptions) -> pa.RecordBatch:
    shard = task.shard
    refine = opts.mode == "refine"
    cols = _score_columns(items, opts, refine)
    if shard.kind == "parquet" and refine:
        arrays = []
        for f in schema:
            if f.name in cols:
                arrays.append(cols[f.name])
            elif f.name == shard.image_column:
                arrays.append(_replace_image_column(raw_batch.column(f.name), items, shard.image_is_struct))
            else:
                arrays.append(raw_batch.column(f.name))
        return pa.RecordBatch.from_arrays(arrays, schema=schema)
    if shard.kind == "tar":
        head = {C.KEY: pa.array([it.item_id for it in items], pa.string()),
                C.PROMPT: pa.array([it.prompt for it in items], pa.string())}
        merged = {**head, **cols}
        return pa.RecordBatch.from_arrays([merged[f.name] for f in schema], schema=schema)
    head: dict[str, pa.Array] = {C.ID: pa.array([it.item_id for it in items], pa.string())}
    if shard.kind == "folder":
        head[C.SOURCE] = pa.array([it.item_id for it in items], pa.string())
        if refine or opts.keep_images:
            _write_folder_images(task, items, opts)
    head[C.PROMPT] = pa.array([it.prompt for it in items], pa.string())
    merged = {**head, **cols}
    # Parquet input: the input columns the schema keeps (the image with --keep-images)
    return pa.RecordBatch.from_arrays([merged[f.name] if f.name in merged else raw_batch.column(f.name)
                                       for f in schema], schema=schema)


def _write_folder_images(task: ShardTask, items: list[Item], opts: ProcessOptions) -> None:
    """OUT/images/<same relative path>: the refined image in the file's own format, else the original bytes."""
    root = join(task.out_root, "images")
    for it in items:
        rel = safe_relpath(it.item_id)
        if it.encoded is not None and it.error is None:
            data = it.encoded  # encoded in the file's own format by encode_outputs
        elif it.raw is not None:
            data = it.raw  # unchanged (skip, reverted, score mode, and error rows: the mirror stays complete)
        else:
            continue
        write_atomic(task.out_fs, join(root, rel), data)


__all__ = [
    "Engine", "EngineSpec", "Item", "ModelEngine", "build_engine", "ProcessOptions", "RefineRequest", "RefineResponse", "ShardResult", "ShardTask",
    "encode_outputs", "map_png", "output_schema", "process_shard", "run_models",
]
