"""Sinks of the curation job: atomic output files, buffered Parquet shards, job state under OUT.

The output contract rests on one rule: every file under OUT is written to a temporary name beside
its final path (``.<name>.grefine-tmp-XXXXXXXX``, hidden, so Parquet readers and our own discovery
skip it) and renamed when complete. A job killed at any moment therefore leaves only complete
files and ignorable temporaries, which the next run deletes. Paths go through ``pyarrow.fs``
(local, s3://, gs://); on object stores the "rename" is a copy whose target appears complete.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from grefine_curate.pipelines.records import encode_record
from grefine_curate.pipelines.sources import STATE_DIR, TMP_MARK, join

# Formats a folder output keeps per extension (refined images are re-encoded in the file's own format).
EXTENSION_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP",
                     ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF"}
FLUSH_ROWS = 1024  # output rows buffered before a Parquet row group is written
FLUSH_BYTES = 64 << 20  # ... or this many bytes, whichever comes first (bounds worker memory)


def marker_path(out_root: str, rel: str) -> str:
    """Completion marker of one output shard: OUT/__grefine__/shards/<rel>.json."""
    return join(out_root, f"{STATE_DIR}/shards/{rel}.json")


def tmp_name(path: str) -> str:
    d, b = posixpath.split(path)
    return join(d, f".{b}{TMP_MARK}{uuid.uuid4().hex[:8]}")


def try_delete(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (OSError, FileNotFoundError):
        pass


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write to a temporary name beside ``path``, then rename: readers never see a partial file."""
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = tmp_name(path)
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        try_delete(fs, tmp)
        raise


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


class ShardWriter:
    """Buffered ParquetWriter on a temporary file; ``commit`` renames it into place, ``abort`` deletes it.

    Rows are appended in input order; row groups of up to FLUSH_ROWS rows / FLUSH_BYTES bytes keep
    both memory and the number of row groups bounded whatever the batch size.
    """

    def __init__(self, fs: pafs.FileSystem, path: str, schema: pa.Schema):
        self.fs, self.path, self.schema = fs, path, schema
        fs.create_dir(posixpath.dirname(path), recursive=True)
        self.tmp = tmp_name(path)
        self._stream = fs.open_output_stream(self.tmp)
        self._writer = pq.ParquetWriter(self._stream, schema, compression="zstd")
        self._buf: list[pa.RecordBatch] = []
        self._rows = self._bytes = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self._buf.append(batch)
        self._rows += batch.num_rows
        self._bytes += batch.nbytes
        if self._rows >= FLUSH_ROWS or self._bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._writer.write_table(pa.Table.from_batches(self._buf, schema=self.schema))
            self._buf, self._rows, self._bytes = [], 0, 0

    def commit(self, record: dict[str, Any] | None = None) -> None:
        """Flush, write the footer (with the commit record, see records.py) and rename into place."""
        self.flush()
        if record is not None:
            self._writer.add_key_value_metadata(encode_record(record))
        self._writer.close()
        self._stream.close()
        self.fs.move(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._writer.close()
            self._stream.close()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        try_delete(self.fs, self.tmp)
