"""Reading labelled data: images with human scores (MOS columns), for `eval` and `train-pq`.

Inputs are found like the `run` job's (``sources.discover``): a Parquet file, a directory of shards
(searched recursively), a glob, any URI pyarrow opens (s3://, gs://, ...), or an image folder whose
``metadata.jsonl`` / ``metadata.csv`` carries the scores next to ``file_name`` (Hugging Face
imagefolder convention). Image columns hold encoded bytes or the Hugging Face ``{bytes, path}``
struct; the image column is detected unless named.

Every column is checked before any image is read: a missing MOS column raises InputError naming
the columns (or metadata fields) found. Items are then streamed; an image that cannot be read
arrives with ``image=None`` and its reason in ``error``, a missing or non-numeric score as ``None``
in ``values``: the caller decides what to skip, and reports it.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from grefine_curate.curate.errors import InputError
from grefine_curate.pipelines.sources import (
    METADATA_FILES,
    ColumnSpec,
    Shard,
    discover,
    folder_files,
    iter_folder_metadata,
    join,
)


@dataclass
class LabelledItem:
    item_id: str  # "<shard>#<row>" (Parquet) or the image's path relative to its folder
    image: bytes | None  # encoded image; None when it could not be read (see error)
    prompt: str | None
    values: dict[str, float | None]  # MOS column -> value; None = missing, null or not a finite number
    error: str | None = None  # why image is None


def float_or_none(v: Any) -> float | None:
    """A finite float, or None for null, booleans, text that is no number, nan and inf."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class LabelledItems:
    """The labelled items of some inputs: checked on construction, read on each iteration.

    ``shards`` are the discovered shards; ``len()`` is the number of items (rows and images).
    """

    def __init__(self, shards: list[Shard], columns: list[str], batch_rows: int,
                 folder_meta: dict[str, dict[str, dict]]):
        self.shards = shards
        self.columns = columns
        self.batch_rows = batch_rows
        self._folder_meta = folder_meta  # folder root -> {image rel path: metadata row}

    def __len__(self) -> int:
        return sum(s.num_rows for s in self.shards)

    def __iter__(self) -> Iterator[LabelledItem]:
        for s in self.shards:
            if s.kind == "parquet":
                yield from _parquet_items(s, self.columns, self.batch_rows)
            else:
                yield from _folder_items(s, self.columns, self._folder_meta[s.path])


def iter_labelled(
    inputs: str | Sequence[str],
    columns: Sequence[str],
    image_column: str | None = None,
    prompt_column: str | None = None,
    batch_rows: int = 256,
    option: str = "--mos-column / --align-mos-column",
) -> LabelledItems:
    """The items of ``inputs`` with the values of the MOS ``columns``, every column checked up front.

    Raises InputError for an input that is not found, a missing image/prompt column, or a missing
    or non-numeric MOS column (naming the columns found), before any image is read.
    """
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    columns = list(dict.fromkeys(columns))
    shards = discover(inputs, ColumnSpec(image=image_column, prompt=prompt_column))
    folder_meta: dict[str, dict[str, dict]] = {}
    for s in shards:
        if s.kind == "parquet":
            with s.fs.open_input_file(s.path) as f:
                schema = pq.ParquetFile(f).schema_arrow
            _check_parquet_columns(s, schema, columns, option)
        elif s.path not in folder_meta:
            folder_meta[s.path] = _folder_metadata(s, columns)
    return LabelledItems(shards, columns, batch_rows, folder_meta)


def load_training_samples(
    data: str | Sequence[str],
    mos_columns: Mapping[str, str] | Sequence[str],
    image_column: str | None = None,
) -> LabelledItems:
    """The training items of ``curate.train_pq.train_pq``: ``data``'s labelled items with the MOS columns.

    ``mos_columns``: the factor -> column mapping given to ``train_pq`` (or just the columns). The
    images stay encoded: ``train_pq`` decodes them one batch at a time and reports the unreadable
    ones and those without an overall MOS. Column errors are raised here, before anything is read.
    """
    cols = list(mos_columns.values()) if isinstance(mos_columns, Mapping) else list(mos_columns)
    return iter_labelled(data, cols, image_column=image_column, option="--mos FACTOR=COLUMN")


# ---------------------------------------------------------------------------------------------
# Parquet


def _check_parquet_columns(shard: Shard, schema: pa.Schema, wanted: list[str], option: str) -> None:
    """Every MOS column present and numeric; ``option`` is the caller's option that names them."""
    names = schema.names
    found = ", ".join(f"{n} ({schema.field(n).type})" for n in names)
    for col in wanted:
        if col not in names:
            raise InputError(
                f"{shard.path}: no MOS column {col!r}; columns found: {found}. "
                f"Pass {option} with one of them."
            )
        t = schema.field(col).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)):
            raise InputError(f"{shard.path}: MOS column {col!r} has type {t}; expected numbers.")


def _parquet_items(shard: Shard, columns: list[str], batch_rows: int) -> Iterator[LabelledItem]:
    with shard.fs.open_input_file(shard.path) as f:
        pf = pq.ParquetFile(f)
        cols = [c for c in dict.fromkeys([shard.image_column, shard.prompt_column, shard.id_column, *columns]) if c]
        row = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
            table = batch.to_pydict()
            for i in range(batch.num_rows):
                raw, error = table[shard.image_column][i], None
                if shard.image_is_struct and raw is not None:
                    raw, error = (raw.get("bytes"), None) if raw.get("bytes") else _read_by_path(shard, raw.get("path"))
                ident = table[shard.id_column][i] if shard.id_column else None
                yield LabelledItem(
                    item_id=str(ident) if ident is not None else f"{shard.rel}#{row}",
                    image=raw,
                    prompt=table[shard.prompt_column][i] if shard.prompt_column else None,
                    values={c: float_or_none(table[c][i]) for c in columns},
                    error=error,
                )
                row += 1


def _read_by_path(shard: Shard, path: str | None) -> tuple[bytes | None, str | None]:
    """A Hugging Face image stored by path only: read it beside the shard (or absolute)."""
    if not path:
        return None, "image struct has neither bytes nor path"
    full = path if path.startswith("/") or "://" in path else join(posixpath.dirname(shard.path), path)
    try:
        with shard.fs.open_input_stream(full) as f:
            return f.read(), None
    except (OSError, pa.ArrowInvalid) as e:
        return None, f"image bytes are null and its path {path!r} cannot be read ({e})"


# ---------------------------------------------------------------------------------------------
# Image folders


def _folder_metadata(shard: Shard, columns: list[str]) -> dict[str, dict]:
    """Metadata rows of an image folder keyed by image path relative to its root; every MOS column checked."""
    rows: dict[str, dict] = {}
    fields: dict[str, None] = {}
    for _, target, row in iter_folder_metadata(shard.fs, folder_files(shard.fs, shard.path)):
        fields.update(dict.fromkeys(row))
        rows[target] = row
    for col in columns:
        if col not in fields:
            raise InputError(
                f"{shard.path}: no MOS field {col!r} in {' / '.join(METADATA_FILES)}; fields found: "
                f"{', '.join(fields) or 'none (no metadata file)'}. An image folder carries its MOS in "
                "metadata.jsonl or metadata.csv next to 'file_name'."
            )
    return rows


def _folder_items(shard: Shard, columns: list[str], meta: dict[str, dict]) -> Iterator[LabelledItem]:
    for it in shard.items:
        entry = meta.get(it.rel, {})
        data, error = None, None
        try:
            with shard.fs.open_input_stream(join(shard.path, it.rel)) as f:
                data = f.read()
        except (OSError, pa.ArrowInvalid) as e:
            error = f"cannot read file ({e})"
        yield LabelledItem(item_id=it.rel, image=data, prompt=it.prompt,
                           values={c: float_or_none(entry.get(c)) for c in columns}, error=error)
