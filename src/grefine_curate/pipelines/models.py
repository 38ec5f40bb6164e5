"""`grefine-curate models pull / list`: fetch the weights a preset needs, and show what is present.

Everything lands in a Hugging Face cache layout (``DIR/models--org--name/snapshots/...``), the same
layout ``load_clip`` and ``load_refiner_pipelines`` read with ``--models-dir DIR``. A preset needs:

- the CLIP weights of its PQ/AQ maps (open_clip's Hugging Face copy of ``clip.model``/``clip.pretrained``,
  e.g. ``timm/vit_base_patch16_clip_224.openai``), unless ``clip.checkpoint`` names a local file;
- the stage-1 inpainting and stage-2 img2img diffusers repositories, only the sub-folders the refiner
  loads (stage 2 shares its text encoder and VAE with stage 1) and only the preset's weight variant
  (``fp16``), so an SDXL pull is about 10 GB rather than the 30+ GB of the full repositories.

The PQ prompt contexts ship inside the package, and the spaCy pipeline is a pip dependency, so
neither needs a pull. ``tiny`` and ``random_weights`` presets need nothing. ``list`` never touches
the network.
"""

from __future__ import annotations

import os
from pathlib import Path

from grefine_curate.curate.config import Preset, available_presets, load_preset
from grefine_curate.curate.diffusion_models import (_WEIGHT_FOLDERS, RepoNeed, hf_cache_location, hub_offline,
                                                    weight_manifest)
from grefine_curate.curate.errors import ModelUnavailableError
from grefine_curate.curate.hub import downloads_allowed, hub_reachable

CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _preset(preset: str | Preset) -> Preset:
    return preset if isinstance(preset, Preset) else load_preset(preset)


def clip_repo(p: Preset) -> str | None:
    """Hugging Face repo holding the preset's CLIP weights; None when nothing is downloaded."""
    import open_clip

    c = p.clip
    if c.model == "tiny" or c.checkpoint or not c.pretrained:
        return None
    cfg = open_clip.get_pretrained_cfg(c.model, c.pretrained)
    if not cfg or not cfg.get("hf_hub"):
        raise ModelUnavailableError(
            f"open_clip has no Hugging Face copy of {c.model}/{c.pretrained}; download its checkpoint by hand "
            f"and set clip.checkpoint to the file"
        )
    return cfg["hf_hub"].rstrip("/")


def _snapshot(repo: str, cache_dir: str, **kw) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo, cache_dir=cache_dir, etag_timeout=10, **kw)


def pull_models(preset: str | Preset, to_dir: str | os.PathLike) -> list[str]:
    """Download every repository ``preset`` needs into ``to_dir`` (a Hugging Face cache layout).

    Returns one line per repository fetched ("component: repo -> local folder"). Fails fast with a
    ``ModelUnavailableError`` when HF_HUB_OFFLINE is set or the hub cannot be reached.
    """
    p = _preset(preset)
    to = str(Path(to_dir).expanduser())
    jobs: list[tuple[str, str, dict]] = []
    repo = clip_repo(p)
    if repo:
        jobs.append(("clip", repo, {"allow_patterns": [CLIP_FILES[0], "open_clip_config.json"]}))
    for need in weight_manifest(p.refiner):
        if Path(need.repo).expanduser().is_dir():
            continue  # a local folder: nothing to download
        jobs.append((need.component, need.repo,
                     {"allow_patterns": need.allow_patterns(), "ignore_patterns": need.ignore_patterns()}))
    if not jobs:
        return []
    if hub_offline():
        raise ModelUnavailableError(
            f"`models pull {p.name}` needs internet, but HF_HUB_OFFLINE is set. Unset it (HF_HUB_OFFLINE=0) on a "
            f"machine that can reach the Hugging Face Hub, pull there, and copy {to} here (then --models-dir {to})."
        )
    if not hub_reachable():
        raise ModelUnavailableError(
            f"`models pull {p.name}` needs internet, but the Hugging Face Hub cannot be reached from this machine "
            f"(HF_ENDPOINT={os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}). Pull on a machine that can "
            f"reach it and copy {to} here (then --models-dir {to})."
        )
    Path(to).mkdir(parents=True, exist_ok=True)
    fetched = []
    for component, repo_id, kw in jobs:
        try:
            folder = _snapshot(repo_id, to, **kw)
            if component == "clip" and not (Path(folder) / CLIP_FILES[0]).exists():
                folder = _snapshot(repo_id, to, allow_patterns=[CLIP_FILES[1], "open_clip_config.json"])
        except Exception as e:  # noqa: BLE001 - network, auth or disk: report what and why
            raise ModelUnavailableError(
                f"cannot download {repo_id} ({component}) into {to}: {type(e).__name__}: "
                f"{' '.join(str(e).split())[:300]} "
                f"Check the connection to the Hugging Face Hub (and HF_TOKEN for gated repositories)."
            ) from e
        fetched.append(f"{component}: {repo_id} -> {folder}")
    return fetched


def _cached_snapshot(repo: str, cache_dir: str | None) -> Path | None:
    """The local snapshot folder of ``repo`` in the cache, without any network access."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, cache_dir=cache_dir, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached
        return None


def _missing_folders(root: Path, need: RepoNeed) -> list[str]:
    """Sub-folders of a diffusers repo that lack their config or weights."""
    if not (root / "model_index.json").exists():
        return ["model_index.json"]
    missing = []
    for folder in need.folders:
        d = root / folder
        has_config = any(d.glob("*.json"))
        has_weights = folder not in _WEIGHT_FOLDERS or any(d.glob("*.safetensors")) or any(d.glob("*.bin"))
        if not (has_config and has_weights):
            missing.append(folder)
    return missing


def _repo_present(need: RepoNeed, cache_dir: str | None) -> str:
    local = Path(need.repo).expanduser()
    root = local if local.is_dir() else _cached_snapshot(need.repo, cache_dir)
    if root is None:
        return "no"
    missing = _missing_folders(root, need)
    return "yes" if not missing else f"no (missing {', '.join(missing)})"


def _clip_present(p: Preset, cache_dir: str | None) -> tuple[str, str]:
    c = p.clip
    if c.model == "tiny":
        return "tiny (random weights, built in code)", "yes"
    if c.checkpoint:
        return f"{c.model} from {c.checkpoint}", "yes" if Path(c.checkpoint).expanduser().exists() else "no"
    if not c.pretrained:
        return f"{c.model} (random weights)", "yes"
    try:
        repo = clip_repo(p)
    except ModelUnavailableError:
        return f"{c.model}/{c.pretrained}", "no (no Hugging Face copy)"
    from huggingface_hub import try_to_load_from_cache

    for filename in CLIP_FILES:
        if isinstance(try_to_load_from_cache(repo, filename, cache_dir=cache_dir), str):
            return f"{c.model}/{c.pretrained} ({repo})", "yes"
    return f"{c.model}/{c.pretrained} ({repo})", "no"


def list_models(models_dir: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """One row per (preset, component): the model it needs and whether it is present locally.

    Keys: preset, component, model, present ("yes", "no" or "no (missing ...)"). Reads only the
    local cache (``models_dir``, else the default Hugging Face cache); never the network.
    """
    cache_dir = str(models_dir) if models_dir else None
    rows = []
    for name in available_presets():
        p = load_preset(name)
        model, present = _clip_present(p, cache_dir)
        rows.append({"preset": name, "component": "clip", "model": model, "present": present})
        r = p.refiner
        if r.kind == "tiny":
            rows.append({"preset": name, "component": "refiner",
                         "model": "tiny (random weights, built in code)", "present": "yes"})
            continue
        if r.random_weights:
            rows.append({"preset": name, "component": "refiner",
                         "model": f"{r.kind} (random weights from configs/arch)", "present": "yes"})
            continue
        for need in weight_manifest(r):
            rows.append({"preset": name, "component": need.component, "model": need.repo,
                         "present": _repo_present(need, cache_dir)})
    return rows


def check_weights(preset: Preset, mode: str, models_dir: str | os.PathLike | None = None) -> None:
    """Fail in seconds, before any executor or model starts, when the weights a job needs are missing.

    Reads only the local cache. When downloads are possible nothing is refused (the workers fetch what
    is missing); otherwise a missing CLIP (any mode) or diffusion repository (refine mode) raises the
    ``ModelUnavailableError`` that loading would raise, naming the model, where it looked and how to
    provide it.
    """
    from grefine_curate.curate.clip_models import _fetch_pretrained
    from grefine_curate.curate.diffusion_models import _how_to_provide

    if downloads_allowed():
        return
    cache_dir = str(models_dir) if models_dir else None
    c = preset.clip
    if c.model != "tiny":
        if c.checkpoint:
            if not Path(c.checkpoint).expanduser().exists():
                raise ModelUnavailableError(f"CLIP checkpoint file not found: {c.checkpoint} (clip.checkpoint)")
        elif c.pretrained:
            _fetch_pretrained(c.model, c.pretrained, cache_dir)  # cache only here; raises the full message
    if mode != "refine":
        return
    for need in weight_manifest(preset.refiner):
        present = _repo_present(need, cache_dir)
        if present != "yes":
            raise ModelUnavailableError(
                f"weights of the {need.component} model {need.repo!r} are not available ({present}). "
                f"{_how_to_provide(preset.refiner.kind, hf_cache_location(models_dir))}"
            )


def cache_location(models_dir: str | os.PathLike | None = None) -> str:
    """Where ``list_models`` looks (for the CLI's header line)."""
    return hf_cache_location(models_dir)
