"""Job state under OUT/__grefine__: the manifest, the config fingerprint, and the resume decision.

``manifest.json`` records the resolved config and its hash, preset and model ids, package versions,
counts per route and status, wall time and throughput. A rerun compares its own hash with the
manifest's: a change that alters results is refused unless ``--force`` (datatrove-style per-shard
markers then decide which shards are already complete).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pyarrow.fs as pafs

from grefine_curate.curate.config import Preset
from grefine_curate.curate.errors import ConfigError
from grefine_curate.pipelines.records import read_record, record_matches
from grefine_curate.pipelines.commit import read_json, write_atomic
from grefine_curate.pipelines.paths import STATE_DIR, join, manifest_path, marker_path  # noqa: F401 (re-exported)
from grefine_curate.pipelines.work import Shard

MANIFEST_VERSION = 1
PACKAGES = ("grefine-curate", "torch", "open_clip_torch", "diffusers", "transformers", "spacy", "ray",
            "pyarrow", "pillow", "numpy")


def result_config(preset: Preset, mode: str, save_maps: bool, keep_images: bool, image_format: str,
                  columns: dict[str, str | None], draft_size: int | None) -> dict[str, Any]:
    """Everything that changes the rows of an output shard (executor, workers, batch size do not)."""
    scheduling = ("unit_rows", "score_unit_rows")  # how work is cut up never changes a row
    return {
        "preset": {k: v for k, v in preset.to_dict().items() if k not in scheduling},
        "mode": mode,
        "save_maps": save_maps,
        "keep_images": keep_images,
        "image_format": image_format,
        "columns": columns,
        "draft_size": draft_size,
    }


def config_hash(cfg: dict[str, Any]) -> str:
    blob = json.dumps(cfg, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def config_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> list[str]:
    """Readable differences between two result configs ("preset.routing.skip_p: 0.7 -> 0.8")."""
    a, b = _flatten(json.loads(json.dumps(old, default=list))), _flatten(json.loads(json.dumps(new, default=list)))
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return diffs[:limit] + ([f"... and {len(diffs) - limit} more"] if len(diffs) > limit else [])


def check_config(fs: pafs.FileSystem, out_root: str, cfg: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """Refuse to mix results of two configs in one OUT (unless ``force``); returns the old manifest."""
    old = read_json(fs, manifest_path(out_root))
    if old is None:
        return None
    old_hash = old.get("config_hash")
    new_hash = config_hash(cfg)
    # A run that wrote no output (a failed start: missing weights, a wrong preset) locks nothing.
    if old_hash and old_hash != new_hash and not force and has_results(fs, out_root):
        changes = config_changes(old.get("result_config", {}), cfg)
        raise ConfigError(
            f"{out_root} holds results of another config (hash {old_hash}, this run {new_hash}; changed: "
            f"{'; '.join(changes) or 'unknown'}). Pass --force to recompute every shard with the new config, "
            "or choose another --out."
        )
    return old


def has_results(fs: pafs.FileSystem, out_root: str) -> bool:
    """Whether OUT holds any completed shard (a completion marker) of an earlier run."""
    sel = pafs.FileSelector(join(out_root, f"{STATE_DIR}/shards"), recursive=True, allow_not_found=True)
    try:
        return any(i.type == pafs.FileType.File and i.path.endswith(".json") for i in fs.get_file_info(sel))
    except (OSError, FileNotFoundError):
        return False


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def model_ids(preset: Preset, mode: str) -> dict[str, Any]:
    clip = preset.clip
    ids: dict[str, Any] = {
        "clip": f"{clip.model}/{clip.checkpoint or clip.pretrained or 'random'}",
        "pq_prompts": preset.pq.prompts,
        "spacy": preset.aq.spacy_model,
    }
    if mode == "refine":
        r = preset.refiner
        ids.update({"refiner_kind": r.kind, "inpaint": r.inpaint_model or None, "img2img": r.img2img_model or None})
    return ids


@dataclass
class ShardState:
    shard: Shard
    row_cap: int | None
    complete: bool
    marker: dict[str, Any] | None
    adopted: bool = False  # complete output found without its marker: adopted from its footer record


def companions_present(fs: pafs.FileSystem, out_root: str, rec: dict[str, Any]) -> bool:
    """Files an output's record vouches for beside itself (a WebDataset tar beside its sidecar), same size."""
    for rel, size in (rec.get("companions") or {}).items():
        info = fs.get_file_info(join(out_root, rel))
        if info.type != pafs.FileType.File or info.size != size:
            return False
    return True


def shard_states(fs: pafs.FileSystem, out_root: str, shards: list[Shard], caps: list[int | None],
                 fingerprint: str, resume: bool) -> list[ShardState]:
    """Which shards are already complete: a marker with the same fingerprint, input and row cap, and its
    output; or, without a marker (a kill between the rename and the marker), an output whose footer
    record says the same (records.py), which is adopted: its marker is written from the record."""
    states = []
    for shard, cap in zip(shards, caps):
        marker = read_json(fs, marker_path(out_root, shard.rel)) if resume else None
        expect = dict(fingerprint=fingerprint, source_key=shard.source_key, row_cap=cap)
        ok = (
            marker is not None
            and all(marker.get(k) == v for k, v in expect.items())
            and fs.get_file_info(join(out_root, shard.record_rel)).type == pafs.FileType.File
            and companions_present(fs, out_root, marker)
        )
        adopted = False
        if resume and not ok:
            rec, rows = read_record(fs, join(out_root, shard.record_rel))
            if record_matches(rec, rows, **expect) and companions_present(fs, out_root, rec):
                write_atomic(fs, marker_path(out_root, shard.rel),
                             json.dumps({**rec, "adopted_at": time.time()}, indent=1).encode())
                marker, ok, adopted = rec, True, True
        states.append(ShardState(shard=shard, row_cap=cap, complete=ok, marker=marker if ok else None,
                                 adopted=adopted))
    return states


def totals(markers: list[dict[str, Any]]) -> dict[str, Any]:
    status: Counter[str] = Counter()
    routes: Counter[str] = Counter()
    rows = 0
    for m in markers:
        rows += int(m.get("rows", 0))
        status.update(m.get("status", {}))
        routes.update(m.get("routes", {}))
    return {"rows": rows, "status": dict(status), "routes": dict(routes)}


def write_manifest(fs: pafs.FileSystem, out_root: str, data: dict[str, Any]) -> None:
    data = {"manifest_version": MANIFEST_VERSION, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **data}
    write_atomic(fs, manifest_path(out_root), json.dumps(data, indent=1, sort_keys=False, default=str).encode())
