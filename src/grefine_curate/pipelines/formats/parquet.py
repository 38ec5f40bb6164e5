"""Parquet shards: one input file is one shard and one output file at the same relative path.

The image column holds encoded bytes or the Hugging Face image struct ``{bytes, path}`` (what
``datasets`` writes; a struct with null bytes names its file by path). Refine mode writes the input
row back with the refined image in place and the score columns added; score mode writes ids,
prompts, the input's other columns (``--no-input-columns``: none) and the scores.

Image paths in data are a policy, not an accident: a path inside the shard's own folder (relative,
or absolute below it) is read; any other path is an error row naming it, unless a folder above it
was allowed (``--allow-paths``). Units are whole row groups.
"""

from __future__ import annotations

import functools
import json
import posixpath
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from grefine_curate.curate.errors import InputError
from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.formats.base import (
    ColumnStream,
    Discovery,
    Format,
    OutputView,
    image_bytes,
    image_path,
    take_rows,
)
from grefine_curate.pipelines.paths import inside, join, resolve_fs, safe_relpath
from grefine_curate.pipelines.records import RECORD_KEY
from grefine_curate.pipelines.work import Item, ProcessOptions, Shard, ShardTask, Unit, clean_prompt

IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes")
PROMPT_COLUMN_CANDIDATES = ("prompt", "text", "caption", "txt")
ID_COLUMN_CANDIDATES = ("id", "key", "uid")  # picked automatically when of string or integer type


def is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or (
        hasattr(pa.types, "is_binary_view") and pa.types.is_binary_view(t)
    )


def pick_columns(where: str, schema: pa.Schema, columns: Any) -> tuple[str, bool, str | None, str | None]:
    """(image column, is a {bytes, path} struct, prompt column, id column) of a table, checked."""
    names = schema.names
    found = ", ".join(f"{n} ({schema.field(n).type})" for n in names)

    def pick(explicit: str | None, candidates: tuple[str, ...], what: str, option: str) -> str | None:
        if explicit is not None:
            if explicit not in names:
                raise InputError(f"{where}: no {what} column {explicit!r}; columns found: {found}. "
                                 f"Pass {option} with one of them.")
            return explicit
        return next((c for c in candidates if c in names), None)

    image_col = pick(columns.image, IMAGE_COLUMN_CANDIDATES, "image", "--image-column")
    if image_col is None:
        raise InputError(f"{where}: no image column found (looked for {', '.join(IMAGE_COLUMN_CANDIDATES)}); "
                         f"columns found: {found}. Pass --image-column NAME.")
    itype = schema.field(image_col).type
    is_struct = pa.types.is_struct(itype)
    if is_struct:
        child_names = [itype.field(i).name for i in range(itype.num_fields)]
        if "bytes" not in child_names or not is_binary(itype.field("bytes").type):
            raise InputError(f"{where}: image column {image_col!r} is a struct without a binary 'bytes' field "
                             f"({itype}); expected raw bytes or the Hugging Face {{bytes, path}} struct.")
    elif not is_binary(itype):
        raise InputError(f"{where}: image column {image_col!r} has type {itype}; expected binary (encoded image "
                         f"bytes) or the Hugging Face {{bytes, path}} struct. Columns found: {found}.")
    prompt_col = pick(columns.prompt, PROMPT_COLUMN_CANDIDATES, "prompt", "--prompt-column")
    if prompt_col is not None:
        ptype = schema.field(prompt_col).type
        if not (pa.types.is_string(ptype) or pa.types.is_large_string(ptype) or pa.types.is_null(ptype)):
            raise InputError(f"{where}: prompt column {prompt_col!r} has type {ptype}; expected string.")
    id_col = pick(columns.id, (), "id", "--id-column")
    if id_col is None:  # an id column found by name is used only when it holds plain values
        id_col = next((c for c in ID_COLUMN_CANDIDATES if c in names and (
            pa.types.is_string(schema.field(c).type) or pa.types.is_large_string(schema.field(c).type)
            or pa.types.is_integer(schema.field(c).type))), None)
    return image_col, is_struct, prompt_col, id_col


def refuse_our_names(where: str, schema: pa.Schema, ours_by_record: bool) -> None:
    """Input columns named like the job's own would be overwritten (or, like a garbage ``pq_map``, read
    back as ours): refused, naming them; an earlier output of this tool (its footer carries our commit
    record) is fine, its columns are replaced (chaining jobs)."""
    clash = [n for n in schema.names if n in C.ADDED]
    if clash and not ours_by_record:
        raise InputError(f"{where}: input column(s) {', '.join(clash)} have the names of columns the job writes and "
                         "would be overwritten; rename them in the input (the job's columns are: "
                         f"{', '.join(C.ADDED)})")


def resolve_data_path(fs: pafs.FileSystem, shard_dir: str, path: str,
                      allow: Sequence[str]) -> tuple[pafs.FileSystem, str] | str:
    """Where an image named by path in the data is read from, or an error text when the policy refuses it.

    Relative paths are taken from the shard's folder and must stay inside it; absolute paths and URIs
    must lie below the shard's folder or a folder the user allowed (``--allow-paths``)."""
    if "://" in path:
        try:
            target_fs, target = resolve_fs(path)
        except InputError:
            return f"its path {path!r} is a URI this build cannot open; store the image bytes instead"
        where = path
    else:
        target_fs = fs
        target = posixpath.normpath(path if path.startswith("/") else join(shard_dir, path))
        where = target
    roots = [(type(fs), shard_dir)] + [_allowed_root(r) for r in allow]
    for root_type, root_path in roots:
        if root_type is type(target_fs) and inside(target, root_path.rstrip("/") or "/"):
            return target_fs, target
    return (f"its path {path!r} lies outside the input's folder {shard_dir} ({where}); pass --allow-paths "
            f"with a folder above it to read it")


@functools.lru_cache(maxsize=64)
def _allowed_root(root: str) -> tuple[type, str]:
    """(filesystem type, path) of an --allow-paths folder: resolved once, not per item (an s3:// root
    would build a client each time)."""
    fs, path = resolve_fs(root)
    return type(fs), path


def read_by_path(fs: pafs.FileSystem, shard_dir: str, item_id: str, path: str,
                 allow: Sequence[str]) -> tuple[bytes | None, str | None]:
    """(bytes, None) or (None, error) for an image struct that names its file by path."""
    got = resolve_data_path(fs, shard_dir, path, allow)
    if isinstance(got, str):
        return None, f"{item_id}: image bytes are null and {got}"
    tfs, target = got
    try:
        with tfs.open_input_stream(target) as fh:
            return fh.read(), None
    except (OSError, pa.ArrowInvalid) as e:
        return None, f"{item_id}: image bytes are null and its path {path!r} cannot be read ({type(e).__name__})"


def hf_feature(t: pa.DataType) -> dict[str, Any]:
    if pa.types.is_list(t):
        return {"feature": hf_feature(t.value_type), "_type": "Sequence"}
    dtype = {pa.string(): "string", pa.float32(): "float32", pa.int64(): "int64", pa.binary(): "binary",
             pa.bool_(): "bool"}[t]
    return {"dtype": dtype, "_type": "Value"}


def hf_metadata(meta: dict[bytes, bytes] | None, fields: list[pa.Field], ours: set[str]) -> dict[bytes, bytes] | None:
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
                new[f.name] = hf_feature(f.type)
        info["info"]["features"] = new
    except (ValueError, KeyError, TypeError, AttributeError):
        return meta
    return {**meta, b"huggingface": json.dumps(info).encode()}


class TableFormat(Format):
    """What Parquet and Arrow inputs share: a table whose rows are items, written back as a table."""

    # ---- input

    def table_items(self, shard: Shard, batch: pa.RecordBatch, start: int, opts: ProcessOptions) -> list[Item]:
        img = batch.column(shard.image_column)
        n = batch.num_rows
        prompts = batch.column(shard.prompt_column).to_pylist() if shard.prompt_column else [None] * n
        if shard.id_column:
            ids = ["" if v is None else str(v) for v in batch.column(shard.id_column).to_pylist()]
            ids = [v or f"{shard.rel}#{start + i}" for i, v in enumerate(ids)]
        else:
            ids = [f"{shard.rel}#{start + i}" for i in range(n)]
        if shard.image_is_struct:
            children = img.flatten()  # offset-aware, unlike .field()
            raws = children[img.type.get_field_index("bytes")].to_pylist()
            k = img.type.get_field_index("path")
            paths = children[k].to_pylist() if k >= 0 else [None] * n
            valid = img.is_valid().to_pylist()
        else:
            raws, paths, valid = img.to_pylist(), [None] * n, [True] * n
        shard_dir = self.data_dir(shard)
        items = []
        for i in range(n):
            it = Item(item_id=ids[i], prompt=clean_prompt(prompts[i]))
            raw = raws[i] if valid[i] else None
            if raw is None and paths[i]:  # a Hugging Face image stored by path only
                raw, it.source_error = read_by_path(shard.fs, shard_dir, it.item_id, paths[i], opts.allow_paths)
            elif raw is None and shard.image_is_struct and valid[i]:
                it.source_error = f"{it.item_id}: image struct has neither bytes nor path"
            it.raw = raw
            items.append(it)
        return items

    def input_schema(self, shard: Shard) -> pa.Schema:
        with shard.fs.open_input_file(shard.path) as f:
            return pq.ParquetFile(f).schema_arrow

    def data_dir(self, shard: Shard) -> str:
        """The folder relative image paths in the data are taken from."""
        return posixpath.dirname(shard.path)

    def units(self, shard: Shard, end: int, unit_rows: int) -> list[Unit]:
        """Whole row groups of about ``unit_rows`` rows: a worker never decodes rows it does not own."""
        if not shard.row_groups:
            return [Unit(0, end)]
        units: list[Unit] = []
        start = pos = 0
        groups: list[int] = []
        for g, n in enumerate(shard.row_groups):
            if pos >= end:
                break
            groups.append(g)
            pos += n
            if pos - start >= unit_rows:
                units.append(Unit(start, min(pos, end), tuple(groups)))
                start, groups = pos, []
        if groups and start < end:
            units.append(Unit(start, min(pos, end), tuple(groups)))
        return units

    # ---- labelled data (train-pq, eval)

    def check_labelled(self, shard: Shard, columns: list[str], option: str) -> Any:
        schema = self.input_schema(shard)
        names = schema.names
        found = ", ".join(f"{n} ({schema.field(n).type})" for n in names)
        for col in columns:
            if col not in names:
                raise InputError(f"{shard.path}: no MOS column {col!r}; columns found: {found}. "
                                 f"Pass {option} with one of them.")
            t = schema.field(col).type
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)):
                raise InputError(f"{shard.path}: MOS column {col!r} has type {t}; expected numbers.")

    def labelled(self, shard, columns, batch_rows, checked):
        _, rows = self.read(ShardTask(shard=shard, out_fs=None, out_root=""), ProcessOptions(batch_size=batch_rows))
        for batch, items in rows:
            values = batch.select(columns).to_pylist()
            yield from zip(items, values)

    # ---- output

    def output_schema(self, shard: Shard, input_schema: pa.Schema | None, added: list[pa.Field],
                      opts: ProcessOptions) -> pa.Schema:
        names = {f.name for f in added}
        if opts.mode == "refine":  # the input row, the refined image in place, the scores added
            kept = [f for f in input_schema if f.name not in names]  # a re-run over our own output replaces them
            return pa.schema(kept + added, metadata=hf_metadata(input_schema.metadata, kept + added, names))
        head = [pa.field(C.ID, pa.string()), pa.field(C.PROMPT, pa.string())]
        taken = {f.name for f in head + added}
        head += [f for f in input_schema if f.name not in taken and (
            f.name == shard.image_column and opts.keep_images or f.name != shard.image_column and opts.input_columns)]
        return pa.schema(head + added, metadata=hf_metadata(input_schema.metadata, head + added, taken))

    def output_batch(self, task: ShardTask, raw: Any, items: list[Item], schema: pa.Schema,
                     cols: dict[str, pa.Array], opts: ProcessOptions) -> pa.RecordBatch:
        shard = task.shard
        if opts.mode == "refine":
            arrays = []
            for f in schema:
                if f.name in cols:
                    arrays.append(cols[f.name])
                elif f.name == shard.image_column:
                    arrays.append(replace_image_column(raw.column(f.name), items, shard.image_is_struct))
                else:
                    arrays.append(raw.column(f.name))
            return pa.RecordBatch.from_arrays(arrays, schema=schema)
        head = {C.ID: pa.array([it.item_id for it in items], pa.string()),
                C.PROMPT: pa.array([it.prompt for it in items], pa.string())}
        merged = {**head, **cols}
        return pa.RecordBatch.from_arrays([merged[f.name] if f.name in merged else raw.column(f.name)
                                           for f in schema], schema=schema)

    # ---- reading back

    def image_column(self, view: OutputView, names: list[str]) -> str | None:
        return self._input_image_column(view, names)

    def _input_image_column(self, view: OutputView, names: list[str]) -> str | None:
        if view.image_column:
            return view.image_column if view.image_column in names else None
        return next((c for c in IMAGE_COLUMN_CANDIDATES if c in names), None)

    def _input_table_path(self, view: OutputView) -> tuple[pafs.FileSystem, str]:
        return resolve_fs(view.input)

    def images(self, view: OutputView, rows: pa.Table, indices: list[int],
               final: bool) -> list[tuple[bytes | None, str | None]]:
        out_names = rows.column_names
        vals: dict[int, Any] = {}
        col = self._input_image_column(view, out_names)
        if final and (view.mode == "refine" or view.keep_images) and col is not None:
            vals = dict(zip(indices, rows.column(col).to_pylist()))
        elif view.input:
            in_fs, in_path = self._input_table_path(view)
            vals = self.take_input(view, in_fs, in_path, indices)
        in_fs, in_path = resolve_fs(view.input) if view.input else (view.out_fs, view.path)
        out = []
        for i in indices:
            v = vals.get(i)
            b, p = image_bytes(v), image_path(v)
            if b is None and p:
                b, _ = read_by_path(in_fs, posixpath.dirname(in_path), "", p, view.allow_paths)
            out.append((b, p))
        return out

    def take_input(self, view: OutputView, in_fs: pafs.FileSystem, in_path: str, indices: list[int]) -> dict[int, Any]:
        with in_fs.open_input_file(in_path) as f:
            names = pq.ParquetFile(f).schema_arrow.names
        col = self._input_image_column(view, names)
        return take_rows(in_fs, in_path, col, indices) if col else {}

    def input_columns(self, view: OutputView) -> ColumnStream | None:
        if view.mode == "refine" or not view.input:
            return None  # a refine output holds the whole input row
        in_fs, in_path = resolve_fs(view.input)
        return ColumnStream(in_fs, in_path)


def replace_image_column(arr: pa.Array, items: Sequence[Item], is_struct: bool) -> pa.Array:
    """The image column with each refined item's new bytes (encoded in step 4b) in place."""
    new = [None if it.error is not None else it.encoded for it in items]
    if all(b is None for b in new):
        return arr  # nothing refined: the original column, zero-copy
    if is_struct:
        children = arr.flatten()  # child arrays with the parent's offset applied (sliced batches)
        k = arr.type.get_field_index("bytes")
        old = children[k].to_pylist()
        children[k] = pa.array([n if n is not None else o for n, o in zip(new, old)], type=children[k].type)
        p = arr.type.get_field_index("path")
        if p >= 0:  # the path names the bytes it holds: its extension follows the refined encoding
            from grefine_curate.pipelines.formats.base import EXTENSION_FORMATS

            ext = {v: k for k, v in EXTENSION_FORMATS.items() if k in (".jpg", ".png", ".webp", ".bmp", ".gif", ".tif")}
            paths = children[p].to_pylist()
            fixed = []
            for it, n, old_path in zip(items, new, paths):
                if n is not None and old_path and getattr(it, "encoded_format", None):
                    old_path = posixpath.splitext(old_path)[0] + ext.get(it.encoded_format, posixpath.splitext(old_path)[1])
                fixed.append(old_path)
            children[p] = pa.array(fixed, type=children[p].type)
        return pa.StructArray.from_arrays(children, fields=list(arr.type), mask=arr.is_null())
    old = arr.to_pylist()
    return pa.array([n if n is not None else o for n, o in zip(new, old)], type=arr.type)


class ParquetFormat(TableFormat):
    name = "parquet"
    noun = "Parquet"  # in messages: "Parquet files"
    summary = "Parquet shards: an image column of bytes or Hugging Face {bytes, path} structs"

    def claims_file(self, path: str) -> bool:
        return path.lower().endswith(".parquet")

    def shards(self, fs, base, infos, ctx: Discovery, every=None) -> list[Shard]:
        out = []
        for info in infos:
            rel = safe_relpath(posixpath.relpath(info.path, base) if base else info.path)
            out.append(self.shard(fs, info, rel, ctx.columns))
        return out

    def shard(self, fs: pafs.FileSystem, info: pafs.FileInfo, rel: str, columns: Any) -> Shard:
        try:
            with fs.open_input_file(info.path) as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
                ours = RECORD_KEY.encode() in (meta.metadata or {})
                num_rows = meta.num_rows
                row_groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{info.path}: not a readable Parquet file ({e}); remove it from the input or repair it") from e
        image_col, is_struct, prompt_col, id_col = pick_columns(info.path, schema, columns)
        refuse_our_names(info.path, schema, ours)
        return Shard(format=self.name, fs=fs, path=info.path, rel=rel, num_rows=num_rows,
                     source_key=f"{info.size}:{info.mtime_ns}", image_column=image_col, image_is_struct=is_struct,
                     prompt_column=prompt_col, id_column=id_col, row_groups=row_groups)

    def read(self, task: ShardTask, opts: ProcessOptions):
        shard = task.shard
        f = shard.fs.open_input_file(shard.path)
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        groups = list(task.row_groups) if task.row_groups is not None else None

        def rows() -> Iterator[tuple[pa.RecordBatch, list[Item]]]:
            start, end = task.start, task.end  # the unit's row groups begin at row `start`
            try:
                for batch in pf.iter_batches(batch_size=opts.batch_size, row_groups=groups):
                    if start >= end:
                        break
                    if start + batch.num_rows > end:
                        batch = batch.slice(0, end - start)
                    yield batch, self.table_items(shard, batch, start, opts)
                    start += batch.num_rows
            finally:
                f.close()

        return schema, rows()


FORMAT = ParquetFormat()
