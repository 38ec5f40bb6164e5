"""The nouns of the job, shared by every layer below the CLI: a shard, a work unit of it, an item,
the options of the step that processes a unit, and what that step reports.

Picklable plain data (they travel to Ray actors). What a shard's bytes mean is its format's business
(``formats/``): the fields below marked with a format are filled and read by that format only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from grefine_curate.curate.config import RoutingConfig
from grefine_curate.pipelines.paths import join, marker_path, part_path


EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_ERROR_RATE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130  # the job's exit codes


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns hold the image, the prompt and the id (None = detect / default)."""

    image: str | None = None  # None: first of IMAGE_COLUMN_CANDIDATES present
    prompt: str | None = None  # None: first of PROMPT_COLUMN_CANDIDATES present, else PQ only
    id: str | None = None  # None: first of ID_COLUMN_CANDIDATES present, else "<shard relative path>#<row index>"


@dataclass
class FolderItem:
    rel: str  # path of the image relative to the folder root (POSIX separators)
    prompt: str | None
    out_rel: str | None = None  # its path under OUT/images (None: safe_relpath(rel))


@dataclass
class Shard:
    """One input (and output) file. Picklable: it travels to Ray actors."""

    format: str  # the registered format that reads and writes it (formats/)
    fs: pafs.FileSystem
    path: str  # the input file (a folder format: the folder root)
    rel: str  # output name relative to OUT (the format's layout decides it)
    num_rows: int
    source_key: str  # changes when the input changes (size/mtime/listing): resume recomputes then
    image_column: str | None = None  # table formats (resolved)
    image_is_struct: bool = False  # Hugging Face {bytes, path} struct
    prompt_column: str | None = None
    id_column: str | None = None
    items: list[FolderItem] = field(default_factory=list)  # image folder: its images
    row_groups: tuple[int, ...] = ()  # table formats: rows per row group / record batch (units are whole groups)
    tar_offsets: tuple[int, ...] = ()  # webdataset: byte offset of each sample's first header
    tar_duplicates: tuple[tuple[int, int], ...] = ()  # webdataset: (sample index, first sample with its key)
    tar_damage: tuple[tuple[int, str], ...] = ()  # webdataset: (sample index, why): samples beside skipped bytes
    files: tuple[str, ...] = ()  # files read with it (a tar's img2dataset sidecar)
    record_rel: str = ""  # the Parquet output carrying the commit record (the format's layout names it; "" = rel)

    def __post_init__(self) -> None:
        if not self.record_rel:
            self.record_rel = self.rel

    @property
    def label(self) -> str:
        return self.rel


@dataclass(frozen=True)
class Unit:
    start: int  # first row, in input order
    stop: int  # one past the last row
    row_groups: tuple[int, ...] | None = None  # table formats: the row groups holding [start, stop)

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ProcessOptions:
    """Everything the unit processor needs besides the unit and the models (picklable, for Ray)."""

    mode: str = "refine"  # "refine" | "score"
    batch_size: int = 8  # images per model call
    save_maps: bool = False  # store P and A as 64x64 8-bit PNG in pq_map / aq_map
    keep_images: bool = False  # score mode: keep the image bytes in the output
    input_columns: bool = True  # score mode, table input: keep the input's other columns (joins, licences)
    image_format: str = "PNG"  # encoding of refined images in Parquet outputs ("PNG" | "JPEG" | "WEBP")
    max_pixels: int = 8192 * 8192  # images above this are error rows, refused before decoding
    pixel_budget: int | None = None  # decoded full-size pixels a unit holds at once (None: pixel_budget.budget_pixels)
    draft_size: int | None = None  # score mode: JPEGs decoded DCT-scaled to at least this side (faster)
    decode_threads: int = 2  # CPU threads decoding images beside the model
    seed: int = 0  # global seed; an item's seed = item_seed(seed, item id)
    fingerprint: str = ""  # job config hash; stored in the marker, resume compares it
    routing: RoutingConfig | None = None  # thresholds in force (None: the engine's preset); the job always sets it
    scores_uri: str | None = None  # refine mode: take p, a, unmatched phrases from this audit (pipelines/audit.py)
    scores_maps: bool = False  # the audit saved maps (copied to rows that are not scored again)
    allow_paths: tuple[str, ...] = ()  # folders (besides the input's own) that image paths in data may name
    batch_hook: Any = None  # called with the batch index after each batch (tests inject faults here)


@dataclass(frozen=True)
class ShardTask:
    """One work unit: rows [start, stop) of a shard (see units.py).

    ``part`` False: the unit is the whole shard and writes the output file itself (and its marker).
    ``part`` True: the unit writes a committed part under OUT/__grefine__/units/; the driver
    concatenates the parts into the output file when the last one lands.
    """

    shard: Shard
    out_fs: pafs.FileSystem
    out_root: str
    row_cap: int | None = None  # --limit: process only the first rows of this shard
    attempt: int = 1
    start: int = 0  # first row (input order) of this unit
    stop: int | None = None  # one past its last row (None: the shard's end, or row_cap)
    row_groups: tuple[int, ...] | None = None  # table formats: the row groups holding [start, stop) (None: all)
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


def commit_record(task: ShardTask, result: ShardResult, opts: ProcessOptions) -> dict[str, Any]:
    """What an output file (or a unit's part) records about itself: resume compares these fields."""
    return {
        **result.to_json(),
        "input": task.shard.path,
        "format": task.shard.format,
        "source_key": task.shard.source_key,
        "fingerprint": opts.fingerprint,
        "row_cap": task.row_cap,
        "units": [] if task.part else [unit_summary(result)],
    }


def unit_summary(res: ShardResult) -> dict[str, Any]:
    """One unit as the shard marker lists it (which node did which rows, in how long)."""
    return {"start": res.start, "stop": res.stop, "rows": res.rows, "node_id": res.node_id,
            "attempt": res.attempt, "seconds": res.seconds}


def as_result(rec: dict[str, Any]) -> ShardResult:
    names = ShardResult.__dataclass_fields__
    return ShardResult(**{k: v for k, v in rec.items() if k in names})


@dataclass
class Item:
    """One input row on its way through the processor."""

    item_id: str
    prompt: str | None
    raw: bytes | None = None  # encoded image bytes (None when absent)
    source_error: str | None = None  # the bytes could not even be read
    image: Any = None  # the decoded PIL image (refine: replaced by the engine's refine_input once scored)
    size: tuple[int, int] | None = None  # (W, H) of the decoded image, kept when `image` is reduced or released
    error: str | None = None
    score: Any = None  # curate.results.ScoreResult
    route: str | None = None
    seed: int | None = None
    refined: Any = None  # the refined PIL image
    p_after: float | None = None
    a_after: float | None = None
    encoded: bytes | None = None  # the refined image, encoded for the output
    pq_png: bytes | None = None  # --save-maps: 64x64 P
    aq_png: bytes | None = None  # --save-maps: 64x64 A
    sample: Any = None  # WebDataset input: the tar sample (members, in order)
    meta: dict[str, Any] | None = None  # WebDataset input: the sample's KEY.json object
    prior: Any = None  # --scores: the audit's scores of this item (pipelines.audit.Prior)
    needs_pixels: bool = True  # False: routed skip from the audit (or its error): never decoded
    source: str | None = None  # image folder: the file's path relative to the folder
    out_rel: str | None = None  # image folder: its path under OUT/images
    encoded_format: str | None = None  # "PNG" | "JPEG" | ...: how `encoded` is encoded


def clean_prompt(p: Any) -> str | None:
    if p is None:
        return None
    s = str(p).strip()
    return s or None
