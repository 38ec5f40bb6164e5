"""Commit records: what an output file says about itself in its Parquet footer.

Every Parquet file the job writes (an output shard, a WebDataset sidecar, a unit's part) carries
one key-value entry ``grefine`` in its footer metadata: a JSON object with the config fingerprint,
the input's ``source_key``, the row range or row cap it covers and its row count (plus status and
route counts). The footer is written last, so a file whose footer parses is complete; together with
the record it is its own proof of completion. A job killed between renaming an output into place
and writing its marker under ``_grefine/shards/`` therefore loses nothing: the rerun reads the
footer, finds a matching record and adopts the file (writing the missing marker) instead of
recomputing it.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

RECORD_KEY = "grefine"  # key of the record in the Parquet footer's key-value metadata
RECORD_VERSION = 1


def encode_record(record: dict[str, Any]) -> dict[str, str]:
    """The footer entry for ``ParquetWriter.add_key_value_metadata``."""
    return {RECORD_KEY: json.dumps({"record_version": RECORD_VERSION, **record}, sort_keys=True, default=str)}


def read_record(fs: pafs.FileSystem, path: str) -> tuple[dict[str, Any] | None, int]:
    """(record, rows in the footer) of a Parquet file; (None, -1) when it is missing, incomplete
    (no valid footer) or written without a record."""
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return None, -1
    raw = (meta.metadata or {}).get(RECORD_KEY.encode())
    if raw is None:
        return None, meta.num_rows
    try:
        rec = json.loads(raw.decode())
    except ValueError:
        return None, meta.num_rows
    return (rec if isinstance(rec, dict) else None), meta.num_rows


def record_matches(rec: dict[str, Any] | None, rows: int, **expected: Any) -> bool:
    """The record names the expected fingerprint / input / range, and the footer holds its row count."""
    if rec is None or rows < 0 or int(rec.get("rows", -1)) != rows:
        return False
    return all(rec.get(k) == v for k, v in expected.items())
