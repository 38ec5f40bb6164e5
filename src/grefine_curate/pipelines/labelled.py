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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


from grefine_curate.pipelines.sources import discover
from grefine_curate.pipelines.formats import get_format
from grefine_curate.pipelines.work import ColumnSpec, Shard


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
    Each shard's format reads its rows and MOS values (formats/: ``check_labelled``, ``labelled``).
    """

    def __init__(self, shards: list[Shard], columns: list[str], batch_rows: int, checked: list[Any]):
        self.shards = shards
        self.columns = columns
        self.batch_rows = batch_rows
        self._checked = checked  # per shard: what its format's check_labelled returned

    def __len__(self) -> int:
        return sum(s.num_rows for s in self.shards)

    def __iter__(self) -> Iterator[LabelledItem]:
        for s, checked in zip(self.shards, self._checked):
            for it, values in get_format(s.format).labelled(s, self.columns, self.batch_rows, checked):
                error = it.source_error
                if error and error.startswith(f"{it.item_id}: "):
                    error = error[len(it.item_id) + 2 :]
                yield LabelledItem(item_id=it.item_id, image=it.raw, prompt=it.prompt,
                                   values={c: float_or_none(values.get(c)) for c in self.columns}, error=error)


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
    checked: list[Any] = []
    by_folder: dict[tuple[str, str], Any] = {}  # a folder's metadata is read once for all its shards
    for s in shards:
        key = (s.format, s.path)
        if key not in by_folder:
            by_folder[key] = get_format(s.format).check_labelled(s, columns, option)
        checked.append(by_folder[key])
    return LabelledItems(shards, columns, batch_rows, checked)


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
