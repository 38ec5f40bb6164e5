"""Atomic files: the one way anything under OUT (or an export's folder) is written.

Every file is written to a temporary name beside its final path (``.<name>.grefine-tmp-XXXXXXXX``,
hidden, so Parquet readers and our own discovery skip it) and renamed when complete. A job killed at
any moment therefore leaves only complete files and ignorable temporaries, which the next run
deletes. Paths go through ``pyarrow.fs`` (local, s3://, gs://); on object stores the "rename" is a
copy whose target appears complete.

``AtomicFile`` is the primitive (a stream with ``commit`` / ``abort``); ``ParquetFile`` buffers
row groups over it and writes the commit record into the footer (records.py); the tar sink, the
unit assembly and the export writers all sit on ``AtomicFile``.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from grefine_curate.pipelines.paths import TMP_MARK, join
from grefine_curate.pipelines.records import encode_record

FLUSH_ROWS = 1024  # output rows buffered before a Parquet row group is written
FLUSH_BYTES = 64 << 20  # ... or this many bytes, whichever comes first (bounds worker memory)


def tmp_name(path: str) -> str:
    d, b = posixpath.split(path)
    return join(d, f".{b}{TMP_MARK}{uuid.uuid4().hex[:8]}")


def try_delete(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (OSError, FileNotFoundError):
        pass


class AtomicFile:
    """An output stream on a temporary name beside ``path``: ``commit`` renames it into place (and
    returns the file's size), ``abort`` deletes it. Usable as a context manager (abort on error)."""

    def __init__(self, fs: pafs.FileSystem, path: str):
        self.fs, self.path = fs, path
        fs.create_dir(posixpath.dirname(path), recursive=True)
        self.tmp = tmp_name(path)
        self.stream = fs.open_output_stream(self.tmp)
        self._open = True

    def write(self, data: bytes) -> None:
        self.stream.write(data)

    def commit(self) -> int:
        self.stream.close()
        self._open = False
        self.fs.move(self.tmp, self.path)
        return self.fs.get_file_info(self.path).size

    def abort(self) -> None:
        if self._open:
            try:
                self.stream.close()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
            self._open = False
        try_delete(self.fs, self.tmp)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._open:
            self.commit()


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a partial file."""
    f = AtomicFile(fs, path)
    try:
        f.write(data)
    except BaseException:
        f.abort()
        raise
    f.commit()


def read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """A JSON state file, or None when it is missing or unreadable (a marker that is not valid = no marker)."""
    try:
        with fs.open_input_stream(path) as f:
            data = json.loads(f.read().decode())
        return data if isinstance(data, dict) else None
    except (FileNotFoundError, OSError, ValueError, pa.ArrowInvalid):
        return None


def clean_stale_temporaries(fs: pafs.FileSystem, root: str) -> int:
    """Delete temporaries left under OUT by a killed run; returns how many were removed."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except (OSError, FileNotFoundError):
        return 0
    n = 0
    for info in infos:
        if info.type == pafs.FileType.File and TMP_MARK in posixpath.basename(info.path):
            try_delete(fs, info.path)
            n += 1
    return n


def clean_shard_temporaries(fs: pafs.FileSystem, path: str) -> int:
    """Delete the temporaries of one output file (a dead worker's partial shard, before its retry)."""
    d, b = posixpath.split(path)
    prefix = f".{b}{TMP_MARK}"
    try:
        infos = fs.get_file_info(pafs.FileSelector(d, recursive=False, allow_not_found=True))
    except (OSError, FileNotFoundError):
        return 0
    gone = [i.path for i in infos if posixpath.basename(i.path).startswith(prefix)]
    for g in gone:
        try_delete(fs, g)
    return len(gone)


class ParquetFile:
    """Buffered ParquetWriter on an AtomicFile; ``commit`` writes the commit record into the footer
    and renames the file into place, ``abort`` deletes it.

    Rows are appended in input order; row groups of up to FLUSH_ROWS rows / FLUSH_BYTES bytes keep
    both memory and the number of row groups bounded whatever the batch size.
    """

    def __init__(self, fs: pafs.FileSystem, path: str, schema: pa.Schema):
        self.fs, self.path, self.schema = fs, path, schema
        self._file = AtomicFile(fs, path)
        self.tmp = self._file.tmp
        self._writer = pq.ParquetWriter(self._file.stream, schema, compression="zstd")
        self._buf: list[pa.RecordBatch | pa.Table] = []
        self._rows = self._bytes = 0

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        self._buf.append(batch)
        self._rows += batch.num_rows
        self._bytes += batch.nbytes
        if self._rows >= FLUSH_ROWS or self._bytes >= FLUSH_BYTES:
            self.flush()

    def write_table_now(self, table: pa.Table) -> None:
        """One row group as it is (assembly copies parts row group by row group)."""
        self.flush()
        self._writer.write_table(table)

    def flush(self) -> None:
        if self._buf:
            tables = [b if isinstance(b, pa.Table) else pa.Table.from_batches([b], schema=self.schema) for b in self._buf]
            self._writer.write_table(pa.concat_tables(tables) if len(tables) > 1 else tables[0])
            self._buf, self._rows, self._bytes = [], 0, 0

    def commit(self, record: dict[str, Any] | None = None) -> None:
        """Flush, write the footer (with the commit record, see records.py) and rename into place."""
        self.flush()
        if record is not None:
            self._writer.add_key_value_metadata(encode_record(record))
        self._writer.close()
        self._file.commit()

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        self._file.abort()


ShardWriter = ParquetFile  # the name the processor and older code use
