"""Hugging Face ``save_to_disk`` folders: ``state.json`` + ``dataset_info.json`` + ``data-*.arrow``
(Arrow IPC streams, as ``datasets.Dataset.save_to_disk`` writes them); a ``DatasetDict`` folder
(``dataset_dict.json``) is one such folder per split.

Each ``.arrow`` file is a shard; its output is a Parquet file at ``<folder>/<file>.parquet`` under
OUT, laid out as a Parquet input's (the image column of bytes or ``{bytes, path}`` structs, the
Hugging Face features kept in the schema metadata), so OUT is a Parquet data set. Units are whole
record batches.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from grefine_curate.curate.errors import InputError
from grefine_curate.pipelines.formats.base import ColumnStream, Discovery, OutputView, stem
from grefine_curate.pipelines.formats.parquet import TableFormat, pick_columns, refuse_our_names
from grefine_curate.pipelines.paths import resolve_fs, safe_relpath
from grefine_curate.pipelines.work import Item, ProcessOptions, Shard, ShardTask

STATE_FILE = "state.json"
DICT_FILE = "dataset_dict.json"


def _open_stream(fs: pafs.FileSystem, path: str):
    """(file, reader) of an Arrow IPC stream; memory-mapped on a local disk (no copy)."""
    f = pa.memory_map(path) if isinstance(fs, pafs.LocalFileSystem) else fs.open_input_file(path)
    try:
        return f, pa.ipc.open_stream(f)
    except pa.ArrowInvalid:
        f.seek(0)
        try:
            return f, pa.ipc.open_file(f)  # the random-access file format, for completeness
        except pa.ArrowInvalid as e:
            f.close()
            raise InputError(f"{path}: not a readable Arrow file ({e}); remove it or save the data set again") from e


def _batches(reader) -> Iterator[pa.RecordBatch]:
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    else:
        yield from reader


class _ArrowColumns(ColumnStream):
    """The input's columns in row order, over an Arrow stream."""

    def __init__(self, fs: pafs.FileSystem, path: str):
        self._f, reader = _open_stream(fs, path)
        self._start(reader.schema, _batches(reader))


class ArrowDatasetFormat(TableFormat):
    name = "arrow-dataset"
    noun = "Arrow"  # in messages: "Arrow files"
    summary = "Hugging Face save_to_disk folders (state.json + data-*.arrow; DatasetDict splits too)"

    def claims_dir(self, fs, path, infos) -> bool:
        names = {posixpath.relpath(i.path, path) for i in infos}
        return STATE_FILE in names or DICT_FILE in names

    def shards(self, fs, base, infos, ctx: Discovery, every=None) -> list[Shard]:
        """``base`` is the save_to_disk folder (or a DatasetDict's); ``infos`` every file under it."""
        files = {posixpath.relpath(i.path, base): i for i in infos}
        folders = sorted(posixpath.dirname(r) for r in files if posixpath.basename(r) == STATE_FILE)
        if not folders:
            raise InputError(f"{base}: a dataset_dict.json without any split folder holding {STATE_FILE}")
        out = []
        for folder in folders:
            state_info = files[posixpath.join(folder, STATE_FILE) if folder else STATE_FILE]
            with fs.open_input_stream(state_info.path) as f:
                try:
                    state = json.loads(f.read().decode())
                    names = [d["filename"] for d in state["_data_files"]]
                except (ValueError, KeyError, TypeError) as e:
                    raise InputError(f"{state_info.path}: not a save_to_disk state file ({e})") from e
            for name in names:
                rel_in = posixpath.join(folder, name) if folder else name
                info = files.get(rel_in)
                if info is None:
                    raise InputError(f"{state_info.path} names {name}, which is not in the folder; save the data set again")
                out.append(self.shard(fs, info, ctx, rel=safe_relpath(f"{ctx.name}/{stem(rel_in)}.parquet")))
        return out

    def shard(self, fs: pafs.FileSystem, info: pafs.FileInfo, ctx: Discovery, rel: str) -> Shard:
        f, reader = _open_stream(fs, info.path)
        try:
            groups = tuple(b.num_rows for b in _batches(reader))
            schema = reader.schema
        finally:
            f.close()
        image_col, is_struct, prompt_col, id_col = pick_columns(info.path, schema, ctx.columns)
        refuse_our_names(info.path, schema, False)
        return Shard(format=self.name, fs=fs, path=info.path, rel=rel, num_rows=sum(groups),
                     source_key=f"{info.size}:{info.mtime_ns}", image_column=image_col, image_is_struct=is_struct,
                     prompt_column=prompt_col, id_column=id_col, row_groups=groups)

    def input_schema(self, shard: Shard) -> pa.Schema:
        f, reader = _open_stream(shard.fs, shard.path)
        f.close()
        return reader.schema

    def read(self, task: ShardTask, opts: ProcessOptions):
        shard = task.shard
        f, reader = _open_stream(shard.fs, shard.path)
        groups = set(task.row_groups) if task.row_groups is not None else None

        def rows() -> Iterator[tuple[pa.RecordBatch, list[Item]]]:
            pos, start, end = 0, task.start, task.end
            try:
                for g, big in enumerate(_batches(reader)):
                    here, pos = pos, pos + big.num_rows
                    if groups is not None and g not in groups or pos <= start:
                        continue
                    if here >= end:
                        break
                    lo, hi = max(start, here) - here, min(end, pos) - here
                    for k in range(lo, hi, opts.batch_size):
                        batch = big.slice(k, min(opts.batch_size, hi - k))
                        yield batch, self.table_items(shard, batch, here + k, opts)
            finally:
                f.close()

        return reader.schema, rows()

    # ---- reading back: the input is an Arrow stream, not Parquet

    def take_input(self, view: OutputView, in_fs, in_path, indices):
        cols = _ArrowColumns(in_fs, in_path)
        try:
            col = self._input_image_column(view, cols.schema.names)
            if col is None or not indices:
                return {}
            t = cols.take(max(indices) + 1).column(col)
            return {i: t[i].as_py() for i in indices}
        finally:
            cols.close()

    def input_columns(self, view: OutputView) -> Any:
        if view.mode == "refine" or not view.input:
            return None
        in_fs, in_path = resolve_fs(view.input)
        return _ArrowColumns(in_fs, in_path)


FORMAT = ArrowDatasetFormat()
