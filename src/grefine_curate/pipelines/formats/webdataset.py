"""WebDataset tars (LAION/DataComp-style sets, img2dataset outputs): one tar is one shard.

A sample is the run of members sharing a key (tar_shards.py): ``KEY.jpg|png|webp`` the image,
``KEY.txt`` the prompt (else ``KEY.json``'s caption/prompt). An img2dataset sidecar
(``00000.parquet`` beside ``00000.tar``: url, sha256, width, ...) is read with its tar, and its
columns are carried into the output sidecar by key.

Output, mirroring the input: in refine mode a tar at the same relative path holding every
sample's members unchanged and in order, except the refined image (in its member's own format) and
``KEY.json`` (the input's fields plus the added columns); in both modes a Parquet sidecar
``<name>.parquet`` with a ``key`` column, the sidecar's input columns and the scores, carrying the
commit record. Units are runs of samples starting at their first header (offsets found at discovery).

Discovery reads every header (tar_shards.tar_index, GNU tar --ignore-zeros rules: concatenated tars
read whole, a corrupt header skipped to the next valid one) and decides what needs the whole tar:
duplicate keys and the samples beside skipped bytes are error rows whatever the unit size, and a
duplicate key's members never enter the output tar (the first sample with the key stays).
"""

from __future__ import annotations

import logging
import posixpath
import tarfile
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from grefine_curate.curate.errors import InputError
from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.commit import try_delete
from grefine_curate.pipelines.formats.base import EXTENSION_FORMATS, Discovery, Format, OutputView, SinkBeside, stem
from grefine_curate.pipelines.paths import join, resolve_fs, safe_relpath
from grefine_curate.pipelines.tar_shards import (
    READ_BLOCK,
    TAR_IMAGE_EXTENSIONS,
    TarIndex,
    TarSink,
    TarWalk,
    concat_tars,
    iter_samples,
    sample_prompt,
    split_member,
    tar_index,
)
from grefine_curate.pipelines.work import Item, ProcessOptions, Shard, ShardTask, Unit, clean_prompt


log = logging.getLogger(__name__)


def _sidecar_of(path: str) -> str:
    return stem(path) + ".parquet"


class _TarBeside(SinkBeside):
    """The mirrored tar a refine unit writes beside its rows (a part tar for a unit of a split tar)."""

    def __init__(self, task: ShardTask):
        self.root = task.out_root.rstrip("/")
        self.path = (stem(task.output_path) + ".tar") if task.part else join(task.out_root, task.shard.rel)
        self.sink = TarSink(task.out_fs, self.path)

    def write(self, items: list[Item], out: pa.RecordBatch) -> None:
        names = [n for n in out.schema.names if n not in (C.KEY, C.PROMPT, C.PQ_MAP, C.AQ_MAP)]
        for it, fields in zip(items, out.select(names).to_pylist()):  # maps are binary: they stay in the sidecar
            ok = it.error is None and it.score is not None
            self.sink.write(it.sample, it.encoded if ok else None, fields, it.meta)

    def commit(self) -> dict[str, int]:
        return {self.path[len(self.root) + 1 :]: self.sink.commit()}

    def abort(self) -> None:
        self.sink.abort()


class WebDatasetFormat(Format):
    name = "webdataset"
    noun = "tar"  # in messages: "tar files"
    summary = "WebDataset .tar shards (KEY.jpg/png/webp + KEY.txt/KEY.json), img2dataset sidecars carried"

    def claims_file(self, path: str) -> bool:
        return path.lower().endswith(".tar")

    def owned(self, paths: set[str]) -> set[str]:
        """A Parquet file beside a tar of the same name is its sidecar, not an input."""
        tars = {stem(p) for p in paths if self.claims_file(p)}
        return {p for p in paths if p.endswith(".parquet") and stem(p) in tars}

    def shards(self, fs, base, infos, ctx: Discovery, every=None) -> list[Shard]:
        out = []
        for info in infos:
            rel = safe_relpath(posixpath.relpath(info.path, base) if base else info.path)
            idx = tar_index(fs, info.path)
            side = _sidecar_of(info.path)
            has_side = fs.get_file_info(side).type == pafs.FileType.File
            out.append(Shard(format=self.name, fs=fs, path=info.path, rel=rel, num_rows=len(idx.offsets),
                             source_key=f"{info.size}:{info.mtime_ns}", tar_offsets=idx.offsets,
                             tar_duplicates=idx.duplicates, tar_damage=idx.damage,
                             files=(side,) if has_side else (), record_rel=stem(rel) + ".parquet"))
        return out

    def units(self, shard: Shard, end: int, unit_rows: int) -> list[Unit]:
        if not shard.tar_offsets:
            return [Unit(0, end)]
        return super().units(shard, end, unit_rows)

    def _sidecar(self, shard: Shard) -> tuple[pa.Schema | None, dict[str, dict[str, Any]]]:
        """The img2dataset sidecar's columns (other than key) and its rows by key."""
        if not shard.files:
            return None, {}
        try:
            with shard.fs.open_input_file(shard.files[0]) as f:
                t = pq.ParquetFile(f).read()
        except (OSError, pa.ArrowInvalid) as e:  # the samples are still read; only the metadata is missing
            log.warning("%s: its sidecar %s cannot be read (%s); its columns are not carried into the output",
                        shard.path, shard.files[0], type(e).__name__)
            return None, {}
        if C.KEY not in t.column_names:
            log.warning("%s: its sidecar %s has no %r column to match samples by; its columns are not carried",
                        shard.path, shard.files[0], C.KEY)
            return None, {}
        keep = [n for n in t.column_names if n not in (C.KEY,) and not n.startswith(("pq_", "aq_", "grefine_"))
                and n not in (C.PROMPT, C.UNMATCHED)]
        rows = {}
        keys = t.column(C.KEY).to_pylist()
        vals = t.select(keep).to_pylist()
        for k, v in zip(keys, vals):
            rows[str(k)] = v
        return pa.schema([t.schema.field(n) for n in keep]), rows

    def read(self, task: ShardTask, opts: ProcessOptions):
        shard = task.shard
        schema, by_key = self._sidecar(shard)
        # The last unit reads to the tar's end (or --limit), not to the header count taken at discovery,
        # so that no sample can be left out if the two passes ever disagree.
        last = task.end >= shard.num_rows
        stop = task.row_cap if last else task.end
        offset = shard.tar_offsets[task.start] if task.start else 0
        # duplicates and damage as discovery decided them over the whole tar, whatever this unit reads
        index = TarIndex(shard.tar_offsets, shard.tar_duplicates, shard.tar_damage)

        def batches() -> Iterator[tuple[Any, list[Item]]]:
            batch: list[Item] = []
            for sample in iter_samples(shard.fs, shard.path, stop=stop, start=task.start, offset=offset,
                                       index=index):
                if sample.index < task.start:
                    continue
                prompt, meta, json_error = sample_prompt(sample)
                it = Item(item_id=sample.key, prompt=clean_prompt(prompt), sample=sample, meta=meta)
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
                if len(batch) >= opts.batch_size:
                    yield self._side_rows(schema, by_key, batch), batch
                    batch = []
            if batch:
                yield self._side_rows(schema, by_key, batch), batch

        return schema, batches()

    @staticmethod
    def _side_rows(schema, by_key, items):
        if schema is None:
            return None
        return pa.Table.from_pylist([by_key.get(it.item_id, {}) for it in items], schema=schema)

    # ---- output

    def record_rel(self, shard: Shard) -> str:
        return stem(shard.rel) + ".parquet"

    def output_files(self, shard: Shard) -> list[tuple[str, str]]:
        return [(self.record_rel(shard), shard.path), (shard.rel, shard.path)]

    def output_schema(self, shard, input_schema, added, opts):
        head = [pa.field(C.KEY, pa.string()), pa.field(C.PROMPT, pa.string())]
        taken = {f.name for f in head + added}
        extra = [f for f in (input_schema or []) if f.name not in taken]
        return pa.schema(head + extra + added)

    def output_batch(self, task, raw, items, schema, cols, opts):
        merged = {C.KEY: pa.array([it.item_id for it in items], pa.string()),
                  C.PROMPT: pa.array([it.prompt for it in items], pa.string()), **cols}
        return pa.RecordBatch.from_arrays([merged[f.name] if f.name in merged else raw.column(f.name).combine_chunks()
                                           for f in schema], schema=schema)

    def encoding(self, item: Item, opts: ProcessOptions) -> str:
        ext = split_member(item.sample.image.info.name)[1]  # a member keeps its name, so its format follows it
        return EXTENSION_FORMATS.get(f".{ext}", opts.image_format)

    def open_sink(self, task: ShardTask, opts: ProcessOptions) -> SinkBeside:
        return _TarBeside(task) if opts.mode == "refine" else SinkBeside()  # score mode: the sidecar only

    def assemble(self, fs, root, shard, part_paths, records):
        if not any(r.get("companions") for r in records):
            return {}
        return {shard.rel: concat_tars(fs, [stem(p) + ".tar" for p in part_paths], join(root, shard.rel))}

    def drop_past(self, fs, root, shard, new_rows, done_rows):
        if new_rows == 0:
            try_delete(fs, join(root, shard.rel))
            try_delete(fs, join(root, self.record_rel(shard)))

    # ---- reading back

    def image_keys(self, view, names):
        return [C.KEY]

    def location(self, view, index, item_id, source):
        record = stem(view.rel) + ".parquet"
        if view.mode == "refine":
            return f"{view.rel}, sample {item_id} (scores: {record} row {index})"
        return f"{record} row {index} (image: sample {item_id} of the input tar)"

    def images(self, view: OutputView, rows: pa.Table, indices: list[int], final: bool):
        keys = [str(k) for k in rows.column(C.KEY).to_pylist()]
        if final and view.mode == "refine":  # the output tar holds each key once (a repeat is left out)
            found = tar_images(view.out_fs, join(view.out_root, view.rel), set(keys))
            return [found.get(k, (None, None)) for k in keys]
        if not view.input:
            return [(None, None)] * len(keys)
        # the input by position (row i is sample i): a repeated key's row shows its own sample
        fs, path = resolve_fs(view.input)
        at = tar_images_at(fs, path, set(indices))
        return [at.get(i, (None, None)) for i in indices]


def tar_images_at(fs: pafs.FileSystem, path: str, positions: set[int]) -> dict[int, tuple[bytes, str]]:
    """{sample position: (image bytes, member name)}, read as the job reads the tar (``iter_samples``,
    so positions are its rows), streaming it once up to the last position wanted."""
    out: dict[int, tuple[bytes, str]] = {}
    if not positions:
        return out
    try:
        for sample in iter_samples(fs, path, stop=max(positions) + 1):
            image = sample.image
            if sample.index in positions and image is not None and image.data is not None:
                out[sample.index] = (image.data, posixpath.basename(image.info.name))
    except (OSError, tarfile.TarError, EOFError, InputError):
        pass  # what was found stays; the rest is "not available"
    return out


def tar_images(fs: pafs.FileSystem, path: str, keys: set[str]) -> dict[str, tuple[bytes, str]]:
    """{key: (image bytes, member name)} for the wanted keys, streaming the tar once (stops when all are
    found); read like the job reads it (past damage, across concatenated tars), the first sample of a
    key winning."""
    out: dict[str, tuple[bytes, str]] = {}
    if not keys:
        return out
    try:
        with fs.open_input_stream(path, buffer_size=READ_BLOCK) as f:
            walk = TarWalk(f)
            while (ti := walk.next()[0]) is not None:
                if not ti.isfile():
                    continue
                key, ext = split_member(ti.name)
                if key in keys and key not in out and ext in TAR_IMAGE_EXTENSIONS:
                    out[key] = (walk.read(ti), posixpath.basename(ti.name))
                    if len(out) == len(keys):
                        break
    except (OSError, tarfile.TarError, EOFError):
        pass  # what was found stays; the rest is "not available"
    return out


FORMAT = WebDatasetFormat()
