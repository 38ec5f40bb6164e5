"""A job's OUT read back (export, report): its manifest, and one view per output shard with its format.

The manifest records each input's format (``inputs[].format``); the format's layout then says
where a row's final and original image are. Manifests written before formats were recorded name
no format: the input's path is then claimed by the registry, as discovery would.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from grefine_curate.curate.errors import InputError
from grefine_curate.pipelines.commit import read_json
from grefine_curate.pipelines.formats import all_formats, get_format
from grefine_curate.pipelines.formats.base import OutputView
from grefine_curate.pipelines.layout import migrate_legacy_layout
from grefine_curate.pipelines.paths import STATE_DIR, is_hidden_or_state, join, manifest_path, reachable, resolve_fs


@dataclass
class JobView:
    fs: pafs.FileSystem
    root: str
    manifest: dict[str, Any]
    outputs: list[OutputView] = field(default_factory=list)
    expected: int = 0  # output shards the job has (some may not be complete yet)

    @property
    def mode(self) -> str:
        return (self.manifest.get("result_config") or {}).get("mode") or "refine"


def _format_of(entry: dict[str, Any]) -> str:
    if entry.get("format"):
        return get_format(entry["format"]).name
    src = str(entry.get("input") or "")
    out = str(entry.get("shard") or "")
    if out.startswith("scores/"):  # an image folder's score shard (older manifests)
        return "imagefolder"
    return next((f.name for f in all_formats() if f.per_file and f.claims_file(src)), "parquet")


def open_job(out_dir: str, what: str = "a `run` or `score` job") -> JobView:
    fs, root = resolve_fs(out_dir)
    info = reachable(fs, root, out_dir)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{out_dir}: not found; pass the --out folder of {what}")
    migrate_legacy_layout(fs, root)
    manifest = read_json(fs, manifest_path(root))
    if manifest is None:
        raise InputError(f"{out_dir}: no {STATE_DIR}/manifest.json; this is not the output folder of {what} "
                         "(pass the --out folder of such a job)")
    view = JobView(fs=fs, root=root, manifest=manifest)
    view.outputs, view.expected = outputs_of(fs, root, manifest)
    return view


def outputs_of(fs: pafs.FileSystem, root: str, manifest: dict[str, Any]) -> tuple[list[OutputView], int]:
    """(the complete output shards, how many the job has) of the job at ``root`` with this manifest."""
    rc = manifest.get("result_config") or {}
    job = manifest.get("job") or {}
    outputs: list[OutputView] = []
    common = dict(out_fs=fs, out_root=root, mode=rc.get("mode") or "refine", keep_images=bool(rc.get("keep_images")),
                  image_column=(rc.get("columns") or {}).get("image"), allow_paths=tuple(job.get("allow_paths") or ()))
    inputs = manifest.get("inputs") or []
    if inputs:
        for entry in inputs:
            rel = entry.get("shard")
            if not rel:
                continue
            path = join(root, entry.get("output") or rel)
            if fs.get_file_info(path).type == pafs.FileType.File:
                outputs.append(OutputView(rel=rel, path=path, input=entry.get("input"), format=_format_of(entry),
                                          **common))
        return outputs, len(inputs)
    # A manifest without the inputs table (older or hand-written): every Parquet output under OUT.
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    for i in sorted(infos, key=lambda i: i.path):
        rel = posixpath.relpath(i.path, root)
        if i.type == pafs.FileType.File and rel.endswith(".parquet") and not is_hidden_or_state(rel):
            outputs.append(OutputView(rel=rel, path=i.path, input=None, format="parquet", **common))
    return outputs, len(outputs)


def output_names(fs: pafs.FileSystem, path: str) -> list[str]:
    with fs.open_input_file(path) as f:
        return list(pq.ParquetFile(f).schema_arrow.names)
