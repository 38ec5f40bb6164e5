"""The data formats of the job, one module each, behind the protocols of ``base.py``.

Adding a format is one module plus one line below; discovery, units, the processor, resume,
export, the report, the audit and ``--limit`` reach it through the registry. The manifest records
each input's format by name, so reading a job back never guesses.
"""

from __future__ import annotations

from grefine_curate.curate.errors import InputError
from grefine_curate.pipelines.formats import arrow_dataset, folder, parquet, webdataset
from grefine_curate.pipelines.formats.base import Format

# Order matters where two could claim one input: folder formats are asked first (a save_to_disk
# folder holds files no other format reads), then file formats by extension.
REGISTRY: dict[str, Format] = {f.name: f for f in (
    arrow_dataset.FORMAT,
    parquet.FORMAT,
    webdataset.FORMAT,
    folder.FORMAT,
)}
LEGACY_NAMES = {"tar": "webdataset", "folder": "imagefolder"}  # kind names of manifests before formats/


def get_format(name: str) -> Format:
    fmt = REGISTRY.get(LEGACY_NAMES.get(name, name))
    if fmt is None:
        raise InputError(f"unknown data format {name!r}; registered: {', '.join(REGISTRY)}")
    return fmt


def all_formats() -> list[Format]:
    return list(REGISTRY.values())


__all__ = ["Format", "REGISTRY", "all_formats", "get_format"]
