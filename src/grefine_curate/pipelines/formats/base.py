"""The two protocols a data format implements: reading its inputs, and laying out its outputs.

A format is one module in this package and one line in the registry (``__init__.py``). The job
knows units, commits and engines; export, the report, the audit and ``--limit`` ask a shard's
format (recorded in the manifest) and never guess it from file names or columns.

Input protocol (what the job needs to read data it has never seen):
    claims_file / claims_dir   which inputs are ours
    shards                     the shards of the claimed files (metadata only: columns checked, rows counted)
    units                      cut a shard into work units (scheduling, retry, resume)
    read                       the items of a unit, batch by batch, in input order

Output layout (what the job writes, and how its outputs are read back):
    record_rel / output_files  the output files of a shard under OUT (record_rel carries the commit record)
    output_schema / output_batch   the rows written for a batch of items
    encoding                   the image format of a refined image
    open_sink                  extra files a unit writes beside its rows (a WebDataset tar), committed with them
    assemble                   join such files when a split shard's last unit lands
    images                     a row's final or original image, for export and the report
    input_columns              the input's columns for rows whose output does not hold them
    drop_past                  what to delete when a smaller --limit is forced
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from grefine_curate.pipelines.work import Item, ProcessOptions, Shard, ShardTask, Unit

# Formats an image file keeps per extension (a refined image is re-encoded in its file's own format).
EXTENSION_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP",
                     ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF"}
IMAGE_EXTENSIONS = tuple(EXTENSION_FORMATS)


@dataclass
class Discovery:
    """What discovery hands a format besides the files: the columns asked for and how folders are cut."""

    columns: Any  # work.ColumnSpec
    folder_shard_size: int = 1000
    name: str = "images"  # an input folder's name (image folders name their score shards after it)


@dataclass
class OutputView:
    """One output shard of a finished (or running) job, as export and the report see it."""

    rel: str  # the shard's name under OUT
    path: str  # the output Parquet file carrying its rows (absolute on out_fs)
    input: str | None  # the input's URI, from the manifest
    format: str
    out_fs: pafs.FileSystem
    out_root: str
    mode: str  # "refine" | "score"
    keep_images: bool = False
    image_column: str | None = None  # --image-column of the job (None: detected)
    allow_paths: tuple[str, ...] = ()


class SinkBeside:
    """Files a unit writes beside its rows (none by default)."""

    def write(self, items: list[Item], out: pa.RecordBatch) -> None:
        pass

    def commit(self) -> dict[str, int]:
        """Commit; returns {path relative to OUT: size} of the files written (the record vouches for them)."""
        return {}

    def abort(self) -> None:
        pass


class Format:
    name = ""
    noun = ""  # in messages: "<noun> files"
    per_file = True  # every claimed file is a shard of its own (else claimed files are grouped)
    summary = ""  # one line for --help and the docs

    # ---- input ---------------------------------------------------------------------------------

    def claims_file(self, path: str) -> bool:
        return False

    def claims_dir(self, fs: pafs.FileSystem, path: str, infos: list[pafs.FileInfo]) -> bool:
        """A folder that is one input of this format as a whole (checked before its files)."""
        return False

    def owned(self, paths: set[str]) -> set[str]:
        """Files of a listing that belong to this format's inputs without being inputs (sidecars)."""
        return set()

    def shards(self, fs: pafs.FileSystem, base: str, infos: list[pafs.FileInfo], ctx: Discovery,
               every: list[pafs.FileInfo] | None = None) -> list[Shard]:
        raise NotImplementedError

    def units(self, shard: Shard, end: int, unit_rows: int) -> list[Unit]:
        """Default: runs of ``unit_rows`` rows."""
        return [Unit(k, min(k + unit_rows, end)) for k in range(0, end, unit_rows)]

    def read(self, task: ShardTask, opts: ProcessOptions) -> tuple[pa.Schema | None, Iterator[tuple[Any, list[Item]]]]:
        """(input schema or None, iterator of (raw batch or None, items)) for the unit's rows, in order."""
        raise NotImplementedError

    def check_labelled(self, shard: Shard, columns: list[str], option: str) -> Any:
        """Check that the MOS ``columns`` exist and are numeric (train-pq, eval); returns what
        ``labelled`` needs. Raises InputError naming the fields found."""
        from grefine_curate.curate.errors import InputError

        raise InputError(f"{shard.path}: {self.name} inputs carry no MOS labels; use Parquet or an image folder")

    def labelled(self, shard: Shard, columns: list[str], batch_rows: int, checked: Any) -> Iterator[tuple[Item, dict]]:
        """(item with its bytes, {MOS column: raw value}) for every row of the shard."""
        raise NotImplementedError

    # ---- output layout -------------------------------------------------------------------------

    def record_rel(self, shard: Shard) -> str:
        return shard.rel

    def output_files(self, shard: Shard) -> list[tuple[str, str]]:
        """(file under OUT, the input it comes from) for every output of the shard (clash checks)."""
        return [(self.record_rel(shard), shard.path)]

    def output_schema(self, shard: Shard, input_schema: pa.Schema | None, added: list[pa.Field],
                      opts: ProcessOptions) -> pa.Schema:
        raise NotImplementedError

    def output_batch(self, task: ShardTask, raw: Any, items: list[Item], schema: pa.Schema,
                     cols: dict[str, pa.Array], opts: ProcessOptions) -> pa.RecordBatch:
        raise NotImplementedError

    def encoding(self, item: Item, opts: ProcessOptions) -> str:
        return opts.image_format

    def open_sink(self, task: ShardTask, opts: ProcessOptions) -> SinkBeside:
        return SinkBeside()

    def assemble(self, fs: pafs.FileSystem, root: str, shard: Shard, part_paths: list[str],
                 records: list[dict[str, Any]]) -> dict[str, int]:
        """Join what the units wrote beside their parts; returns the companions of the output."""
        return {}

    def drop_past(self, fs: pafs.FileSystem, root: str, shard: Shard, new_rows: int, done_rows: int) -> None:
        """A forced smaller --limit: delete files of rows [new_rows, done_rows) kept outside the rows
        (and the outputs themselves when ``new_rows`` is 0; the job deletes the marker)."""
        if new_rows == 0:
            from grefine_curate.pipelines.commit import try_delete
            from grefine_curate.pipelines.paths import join

            for rel, _ in self.output_files(shard):
                try_delete(fs, join(root, rel))

    def finish(self, fs: pafs.FileSystem, root: str, shards: list[Shard], mode: str, keep_images: bool) -> None:
        """After a run, over its complete shards of this format: files that describe OUT as a data set."""

    # ---- reading a job back --------------------------------------------------------------------

    def images(self, view: OutputView, rows: pa.Table, indices: list[int],
               final: bool) -> list[tuple[bytes | None, str | None]]:
        """(bytes, path) of each row's final image (``final``) or original, for the given output rows
        (``rows`` holds their output columns, ``indices`` their positions in the shard)."""
        raise NotImplementedError

    def image_keys(self, view: OutputView, names: list[str]) -> list[str]:
        """The output columns ``images`` reads from the rows it is given."""
        col = self.image_column(view, names)
        return [col] if col else []

    def location(self, view: OutputView, index: int, item_id: str, source: str | None) -> str:
        """Where a row's final image is, relative to OUT (the report shows it to a curator)."""
        if view.mode == "refine" or view.keep_images:
            return f"{view.rel} row {index}"
        return f"{view.rel} row {index} (image: the same row of the input shard)"

    def image_column(self, view: OutputView, names: list[str]) -> str | None:
        """The column of the output rows (or the merged input) that holds the image (None: kept elsewhere)."""
        return None

    def input_columns(self, view: OutputView) -> "ColumnStream | None":
        """The input's columns in row order, for outputs that do not carry them (None: the output has them)."""
        return None


# ---------------------------------------------------------------------------------------------
# Helpers shared by the formats


def image_bytes(v: Any) -> bytes | None:
    if isinstance(v, dict):  # Hugging Face {bytes, path}
        v = v.get("bytes")
    return bytes(v) if isinstance(v, (bytes, bytearray)) and len(v) else None


def image_path(v: Any) -> str | None:
    return v.get("path") if isinstance(v, dict) else None


def take_rows(fs: pafs.FileSystem, path: str, column: str, rows: list[int]) -> dict[int, Any]:
    """Values of one column at the given row indices of a Parquet file, reading only the row groups that hold them."""
    out: dict[int, Any] = {}
    if not rows:
        return out
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        if column not in pf.schema_arrow.names:
            return out
        wanted = sorted(set(rows))
        start = 0
        for g in range(pf.metadata.num_row_groups):
            size = pf.metadata.row_group(g).num_rows
            inside = [r for r in wanted if start <= r < start + size]
            if inside:
                col = pf.read_row_group(g, columns=[column]).column(0)
                for r in inside:
                    out[r] = col[r - start].as_py()
            start += size
    return out


class ColumnStream:
    """Columns of one Parquet file read in step with another file of the same rows (same order)."""

    def __init__(self, fs: pafs.FileSystem, path: str, columns: list[str] | None = None, batch_rows: int = 256):
        self._f = fs.open_input_file(path)
        pf = pq.ParquetFile(self._f)
        schema = pf.schema_arrow if columns is None else pa.schema([pf.schema_arrow.field(c) for c in columns])
        self._start(schema, pf.iter_batches(batch_size=batch_rows, columns=columns))

    def _start(self, schema: pa.Schema, batches) -> None:
        self.schema = schema
        self._it = iter(batches)
        self._buf: pa.Table | None = None

    def take(self, n: int) -> pa.Table:
        from grefine_curate.curate.errors import InputError

        parts = [] if self._buf is None else [self._buf]
        have = 0 if self._buf is None else self._buf.num_rows
        while have < n:
            b = next(self._it, None)
            if b is None:
                raise InputError("an input shard has fewer rows than its output; was it changed after the job?")
            parts.append(pa.Table.from_batches([b]))
            have += b.num_rows
        t = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        self._buf = t.slice(n) if t.num_rows > n else None
        return t.slice(0, n)

    def close(self) -> None:
        self._f.close()


def read_file(fs: pafs.FileSystem, path: str) -> bytes | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, pa.ArrowInvalid):
        return None


def stem(path: str) -> str:
    return posixpath.splitext(path)[0]
