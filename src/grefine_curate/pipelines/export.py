"""``grefine-curate export OUT --to DIR``: a job's output as a clean training data set.

For every ``ok`` row of OUT (error rows are left out and counted), optionally filtered by
``--where`` (``pipelines/where.py``), write:

- the final image (refined, or the original when kept as is), as the Hugging Face image struct
  ``{bytes, path}`` in the ``image`` column, so ``datasets`` shows it as an image;
- the input columns (Parquet input: every column of the input row; folder input: the prompt and
  the source path);
- the scores and route columns of the job (``pq_score``, ``aq_score``, ``*_after``, ``grefine_route``,
  ``unmatched_phrases``, ...); with ``--save-maps``, ``pq_map`` / ``aq_map`` as image structs too.

Where the final image comes from: Parquet refine output: its image column; score output: the
input shard's row (or the output's copy with ``--keep-images``); folder input: ``OUT/images/<path>``
when the job wrote it, else the input folder. A row whose image cannot be read is left out and
counted with the first message; nothing disappears without a count.

Formats:

- ``parquet``: ``DIR/<output shard path>`` (same names as OUT), schema with Hugging Face features
  metadata (``image`` / maps as ``Image``); zero-row shards are not written.
- ``webdataset``: ``DIR/<output shard path without .parquet>.tar``, one sample per row: ``KEY.<ext>``
  (the image in its own format), ``KEY.json`` (every other column that JSON can hold),
  ``KEY.txt`` (the prompt, when there is one), ``KEY.pq_map.png`` / ``KEY.aq_map.png``.
- ``imagefolder``: ``DIR/<image files>`` and ``DIR/metadata.jsonl`` (``file_name`` + the columns),
  the Hugging Face imagefolder layout; maps as ``DIR/maps/KEY.pq_map.png`` named in ``pq_map_file_name`` (flat: no folder named after a shard).

An input column named ``image`` that is not the image column is kept as ``image_input_column``.
Binary input columns other than the image cannot go into JSON (webdataset, imagefolder): they are
left out there and the summary names them.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from grefine_curate.curate.errors import ConfigError
from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.commit import AtomicFile, write_atomic
from grefine_curate.pipelines.formats import get_format
from grefine_curate.pipelines.formats.base import ColumnStream, OutputView
from grefine_curate.pipelines.job_view import open_job
from grefine_curate.pipelines.paths import inside, join, resolve_fs, store_error
from grefine_curate.pipelines.where import parse_where

FORMATS = ("parquet", "webdataset", "imagefolder")
IMAGE = "image"  # the exported image column (Hugging Face convention)
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
ROW = "__grefine_row__"  # a row's position in its output shard while it is exported
DROPPED = (C.STATUS, C.ERROR)  # every exported row is ok: these say nothing
READ_ROWS = 256  # rows per record batch read from OUT


@dataclass
class ExportSummary:
    to: str
    format: str
    rows_in: int = 0  # rows of OUT's complete output shards
    rows_written: int = 0
    errors_left_out: int = 0  # grefine_status == error
    where_left_out: int = 0  # ok rows that --where did not select
    missing_left_out: int = 0  # ok rows whose image could not be read
    missing_example: str | None = None
    columns_left_out: dict[str, str] = field(default_factory=dict)  # column -> why (webdataset/imagefolder)
    files: int = 0
    shards_missing: int = 0  # output shards of the job not (yet) written (an unfinished job)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [f"exported {self.rows_written} of {self.rows_in} rows to {self.to} ({self.format}, {self.files} file(s), "
               f"{self.seconds:.1f}s)",
               f"left out: {self.errors_left_out} error rows, {self.where_left_out} not matching --where, "
               f"{self.missing_left_out} without a readable image"]
        if self.missing_example:
            out.append(f"  first unreadable image: {self.missing_example}")
        for col, why in self.columns_left_out.items():
            out.append(f"column {col} left out: {why}")
        if self.shards_missing:
            out.append(f"note: {self.shards_missing} output shard(s) of the job are not complete yet; "
                       "rerun the job to finish them, then export again")
        return out


# ---------------------------------------------------------------------------------------------
# Reading OUT


def image_extension(data: bytes) -> str:
    """The file extension of encoded image bytes, from their magic number."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tif"
    return "img"


def _rows(view: OutputView, where_text: str | None,
          summary: ExportSummary) -> Iterator[tuple[pa.Table, list[bytes | None], list[str | None]]]:
    """(exported columns, final image bytes, image path) per batch of one output shard, ok rows only;
    the shard's format says where its final images are and which input columns the output lacks."""
    fmt = get_format(view.format)
    out = ColumnStream(view.out_fs, view.path, None, READ_ROWS)
    inp = fmt.input_columns(view)
    where = None
    if where_text:
        where = parse_where(where_text, out.schema if inp is None else _merged_schema(inp.schema, out.schema))
    try:
        left = shard_rows(view.out_fs, view.path)
        pos = 0
        while left > 0:
            n = min(READ_ROWS, left)
            t = out.take(n)
            if inp is not None:
                t = _merge(inp.take(n), t)
            t = t.append_column(ROW, pa.array(range(pos, pos + n), pa.int64()))
            pos += n
            left -= n
            summary.rows_in += n
            ok = pc.equal(t.column(C.STATUS), C.STATUS_OK)
            kept = t.filter(ok)
            summary.errors_left_out += n - kept.num_rows
            if where is not None:
                before = kept.num_rows
                kept = kept.filter(where)
                summary.where_left_out += before - kept.num_rows
            if kept.num_rows == 0:
                continue
            got = fmt.images(view, kept, kept.column(ROW).to_pylist(), final=True)
            images = [b for b, _ in got]
            paths = [p for _, p in got]
            for b, p in got:
                if b is None and summary.missing_example is None:
                    summary.missing_example = f"{view.rel}: the image {p!r} cannot be read" if p else \
                        f"{view.rel}: an image cell is null or empty"
            yield kept.drop_columns([ROW]), images, paths
    finally:
        out.close()
        if inp is not None:
            inp.close()


def shard_rows(fs: pafs.FileSystem, path: str) -> int:
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def _merged_schema(inp: pa.Schema, out: pa.Schema) -> pa.Schema:
    names = set(out.names)
    return pa.schema([f for f in inp if f.name not in names] + list(out))


def _merge(inp: pa.Table, out: pa.Table) -> pa.Table:
    """Input columns first (input order), then the job's columns (which win on a name clash)."""
    names = set(out.column_names)
    cols = {c: inp.column(c) for c in inp.column_names if c not in names}
    cols.update({c: out.column(c) for c in out.column_names})
    return pa.table(cols)


# ---------------------------------------------------------------------------------------------
# Writers


def _exported_table(t: pa.Table, images: list[bytes | None], paths: list[str | None], src_image: str | None,
                    keys: list[str]) -> pa.Table:
    """The exported columns: image struct first, the input columns, the job's columns; maps as structs."""
    cols: dict[str, pa.Array] = {}
    exts = [image_extension(b) for b in images]
    cols[IMAGE] = pa.array([{"bytes": b, "path": p or f"{k}.{e}"} for b, p, k, e in zip(images, paths, keys, exts)],
                           IMAGE_STRUCT)
    for name in t.column_names:
        if name in DROPPED or name == src_image:
            continue
        if name == IMAGE:  # an input column named like the exported image column (the image is elsewhere)
            cols["image_input_column"] = t.column(name)
            continue
        col = t.column(name)
        if name in (C.PQ_MAP, C.AQ_MAP):
            vals = col.to_pylist()
            col = pa.array([None if v is None else {"bytes": v, "path": f"{k}.{name}.png"} for v, k in zip(vals, keys)],
                           IMAGE_STRUCT)
        cols[name] = col
    return pa.table(cols)


def _hf_feature(t: pa.DataType, image: bool = False) -> Any:
    """Hugging Face ``datasets`` feature dict of an Arrow type (the schema metadata datasets reads)."""
    if image:
        return {"_type": "Image"}
    if pa.types.is_struct(t):
        return {t.field(i).name: _hf_feature(t.field(i).type) for i in range(t.num_fields)}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return {"feature": _hf_feature(t.value_type), "_type": "List"}
    if pa.types.is_timestamp(t):
        return {"dtype": f"timestamp[{t.unit}{', tz=' + t.tz if t.tz else ''}]", "_type": "Value"}
    names = {pa.string(): "string", pa.large_string(): "large_string", pa.binary(): "binary",
             pa.large_binary(): "large_binary", pa.bool_(): "bool", pa.float16(): "float16", pa.float32(): "float32",
             pa.float64(): "float64", pa.int8(): "int8", pa.int16(): "int16", pa.int32(): "int32", pa.int64(): "int64",
             pa.uint8(): "uint8", pa.uint16(): "uint16", pa.uint32(): "uint32", pa.uint64(): "uint64",
             pa.null(): "null", pa.date32(): "date32"}
    if t in names:
        return {"dtype": names[t], "_type": "Value"}
    raise TypeError(str(t))


def _with_hf_features(schema: pa.Schema) -> pa.Schema:
    try:
        feats = {f.name: _hf_feature(f.type, image=f.name in (IMAGE, C.PQ_MAP, C.AQ_MAP)) for f in schema}
    except TypeError:  # a column type we cannot name: datasets infers the features itself (image as a struct)
        return schema.remove_metadata()
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": feats}})})


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


def _json_columns(t: pa.Table, summary: ExportSummary) -> list[str]:
    keep = []
    for f in t.schema:
        if f.name in (IMAGE, C.PQ_MAP, C.AQ_MAP):
            continue
        if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) or pa.types.is_fixed_size_binary(f.type):
            summary.columns_left_out.setdefault(f.name, "binary data cannot go into JSON (use --format parquet)")
            continue
        keep.append(f.name)
    return keep


def _prompt_column(t: pa.Table) -> str | None:
    return next((c for c in (C.PROMPT, "prompt", "text", "caption") if c in t.column_names), None)


class _ParquetOut:
    """DIR/<output shard path>: one Parquet file per output shard (zero-row shards are not written)."""

    def __init__(self, fs, to_root):
        self.fs, self.root = fs, to_root
        self.file: AtomicFile | None = None
        self.writer = None

    def open(self, rel: str) -> None:
        self.path = join(self.root, rel)

    def write(self, t: pa.Table, keys: list[str], summary: ExportSummary) -> None:
        if self.writer is None:
            self.file = AtomicFile(self.fs, self.path)
            self.schema = _with_hf_features(t.schema)
            self.writer = pq.ParquetWriter(self.file.stream, self.schema, compression="zstd")
        self.writer.write_table(t.cast(self.schema) if t.schema != self.schema else t)

    def close(self, summary: ExportSummary) -> None:
        if self.writer is not None:
            self.writer.close()
            self.file.commit()
            summary.files += 1
            self.writer = self.file = None

    def abort(self) -> None:
        if self.file is not None:
            self.file.abort()


class _TarOut:
    """DIR/<output shard path>.tar: one WebDataset sample per row."""

    def __init__(self, fs, to_root):
        self.fs, self.root = fs, to_root
        self.tar = None
        self.file: AtomicFile | None = None

    def open(self, rel: str) -> None:
        self.path = join(self.root, (rel[: -len(".parquet")] if rel.endswith(".parquet") else rel) + ".tar")

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def write(self, t: pa.Table, keys: list[str], summary: ExportSummary) -> None:
        if self.tar is None:
            self.file = AtomicFile(self.fs, self.path)
            self.tar = tarfile.open(fileobj=self.file.stream, mode="w|")
        keep = _json_columns(t, summary)
        prompt = _prompt_column(t)
        meta = t.select(keep).to_pylist()
        for i, img in enumerate(t.column(IMAGE).to_pylist()):
            key = keys[i]
            self._add(f"{key}.{image_extension(img['bytes'])}", img["bytes"])
            self._add(f"{key}.json", json.dumps(_jsonable(meta[i]), ensure_ascii=False).encode())
            if prompt is not None and meta[i].get(prompt):
                self._add(f"{key}.txt", str(meta[i][prompt]).encode())
            for m in (C.PQ_MAP, C.AQ_MAP):
                if m in t.column_names:
                    v = t.column(m)[i].as_py()
                    if v is not None:
                        self._add(f"{key}.{m}.png", v["bytes"])

    def close(self, summary: ExportSummary) -> None:
        if self.tar is not None:
            self.tar.close()
            self.file.commit()
            summary.files += 1
            self.tar = self.file = None

    def abort(self) -> None:
        if self.file is not None:
            self.file.abort()


class _FolderOut:
    """DIR/<key>.<ext> and DIR/metadata.jsonl, maps in DIR/maps/ named by ``pq_map_file_name``.

    Flat on purpose: a folder named after an output shard (``train-00000.parquet`` -> ``train/``)
    would be read by ``datasets`` as a split of its own, with the metadata file outside it."""

    def __init__(self, fs, to_root):
        self.fs, self.root = fs, to_root
        self.meta: list[bytes] = []

    def open(self, rel: str) -> None:
        pass

    def write(self, t: pa.Table, keys: list[str], summary: ExportSummary) -> None:
        keep = _json_columns(t, summary)
        meta = t.select(keep).to_pylist()
        for i, img in enumerate(t.column(IMAGE).to_pylist()):
            key = keys[i]
            name = f"{key}.{image_extension(img['bytes'])}"
            write_atomic(self.fs, join(self.root, name), img["bytes"])
            summary.files += 1
            row = {"file_name": name, **_jsonable(meta[i])}
            for m in (C.PQ_MAP, C.AQ_MAP):
                if m in t.column_names:
                    v = t.column(m)[i].as_py()
                    row[f"{m}_file_name"] = None
                    if v is not None:
                        mname = f"maps/{key}.{m}.png"
                        write_atomic(self.fs, join(self.root, mname), v["bytes"])
                        summary.files += 1
                        row[f"{m}_file_name"] = mname
            self.meta.append(json.dumps(row, ensure_ascii=False).encode())

    def close(self, summary: ExportSummary) -> None:
        pass

    def abort(self) -> None:
        pass

    def finish(self, summary: ExportSummary) -> None:
        write_atomic(self.fs, join(self.root, "metadata.jsonl"), b"\n".join(self.meta) + (b"\n" if self.meta else b""))
        summary.files += 1


# ---------------------------------------------------------------------------------------------
# The command


def export(out_dir: str, to: str, where: str | None = None, fmt: str = "parquet", quiet: bool = False) -> ExportSummary:
    """Export the ok rows of a job's OUT to ``to`` (see the module docstring). ConfigError/InputError: exit 2."""
    t0 = time.perf_counter()
    # 1. Check inputs
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if where is not None and not where.strip():
        raise ConfigError("--where is empty; give a condition (e.g. \"pq_score >= 0.5\") or leave the option out")
    job = open_job(out_dir)
    fs, root = job.fs, job.root
    to_fs, to_root = resolve_fs(to)
    if type(to_fs) is type(fs) and inside(to_root.rstrip("/"), root.rstrip("/")):
        raise ConfigError(f"--to {to} is inside OUT {out_dir}; export to a folder outside it")
    try:
        info = to_fs.get_file_info(to_root)
        if info.type == pafs.FileType.File or (
                info.type == pafs.FileType.Directory and to_fs.get_file_info(pafs.FileSelector(to_root))):
            raise ConfigError(f"--to {to} exists and is not an empty folder; choose a new folder")
    except OSError as e:
        raise store_error(to, e) from e
    views = job.outputs
    if where:  # check the expression against the first shard before writing anything
        first = _view_schema(views[0]) if views else pa.schema([])
        parse_where(where, first)
    # 2. Rows, shard by shard
    summary = ExportSummary(to=to_root, format=fmt, shards_missing=max(0, job.expected - len(views)))
    to_fs.create_dir(to_root, recursive=True)
    writer = {"parquet": _ParquetOut, "webdataset": _TarOut, "imagefolder": _FolderOut}[fmt](to_fs, to_root)
    total = sum(shard_rows(fs, v.path) for v in views)
    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="export", unit="row", dynamic_ncols=True)
    count = 0
    try:
        for view in views:
            writer.open(view.rel)
            seen = summary.rows_in
            src = get_format(view.format).image_column(view, _view_schema(view).names)
            for t, images, paths in _rows(view, where, summary):
                have = [b is not None for b in images]
                if not all(have):
                    summary.missing_left_out += have.count(False)
                    t = t.filter(pa.array(have))
                    images = [b for b in images if b is not None]
                    paths = [p for p, h in zip(paths, have) if h]
                if t.num_rows == 0:
                    continue
                keys = [f"{count + i:09d}" for i in range(t.num_rows)]
                count += t.num_rows
                table = _exported_table(t, images, paths, src, keys)
                writer.write(table, keys, summary)
                summary.rows_written += table.num_rows
                if bar is not None:
                    bar.update(summary.rows_in - seen)
                    seen = summary.rows_in
            writer.close(summary)
            if bar is not None:
                bar.update(summary.rows_in - seen)
        if hasattr(writer, "finish"):
            writer.finish(summary)
    except BaseException:
        writer.abort()  # the file being written; files already committed stay (a rerun needs an empty --to)
        raise
    finally:
        if bar is not None:
            bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _view_schema(view: OutputView) -> pa.Schema:
    """The columns --where can name for this shard (the job's columns, and the input's where the output lacks them)."""
    with view.out_fs.open_input_file(view.path) as f:
        out_schema = pq.ParquetFile(f).schema_arrow
    inp = get_format(view.format).input_columns(view)
    if inp is None:
        return out_schema
    try:
        return _merged_schema(inp.schema, out_schema)
    finally:
        inp.close()


__all__ = ["FORMATS", "ExportSummary", "export", "image_extension"]
