"""Training the PQ-Map prompt contexts on MOS data (G-Refine paper section 3.1 and section 4.1).

The paper trains the text side only: the four learned contexts T_p, with the CLIP image encoder
frozen, Adam, on the AIGIQA-20K MOS. The recipe here is pyiqa's CLIP-IQA+ one: Adam (lr 2e-3),
cosine annealing over all steps, batch 8, loss ``MSE + (1 - PLCC)`` between the factor scores
(P(good) at CLS, in [0, 1]) and the MOS min-max normalised to [0, 1].

Because the image side is frozen, the (normalised) CLS feature of every image is computed once by
the same surgery forward that inference uses; training then runs the text transformer only, so
it is cheap on a CPU. The price: no random-crop / flip augmentation (pyiqa's recipe has it).

Targets: the ``overall`` MOS column is required; per-factor columns (technical, rationality,
naturalness) are optional. A factor without its own column is trained on the overall MOS
(``unlabelled="overall"``, default) or keeps its initial context (``unlabelled="fixed"``). A
missing value in a factor column masks that item for that factor only; items without an overall
MOS are skipped and listed in the report.

Model selection: after every epoch the held-out split (``val_fraction``, at least 3 items) is
scored; SRCC/PLCC of p (eq. 3 cask) and of each factor score against the overall MOS are
recorded; the contexts with the best held-out SRCC of ``select`` ("p" or "overall") are written
as the project's safetensors prompt file (``prompts.LearnedPrompts.save``). Epoch 0 is the
starting point, so a run that never improves keeps the initial contexts.

Data: any iterable of items with ``item_id``, ``image`` (a PIL image or encoded bytes), ``values``
(MOS column -> number or None) and ``error`` (why the image is missing): ``MosSample`` in a notebook,
or ``pipelines.labelled.load_training_samples`` for Parquet files, directories, globs, URIs and
image folders with ``metadata.csv`` / ``metadata.jsonl``. It is read once, as a stream: images are
decoded one batch at a time and only their CLS features are kept.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from grefine_curate.curate.clip_models import ClipBundle, load_clip
from grefine_curate.curate.config import FACTORS, Preset, load_preset
from grefine_curate.curate.errors import ConfigError, GRefineError, InputError
from grefine_curate.curate.images import decode_image
from grefine_curate.curate.pq_map import cask, check_pq_config, good_probability, normalise_features
from grefine_curate.curate.prompts import LearnedPrompts, resolve_prompt_file, text_width
from grefine_curate.curate.surgery import SurgeryEncoder, preprocess_images

DEFAULT_MOS_COLUMNS = {"overall": "mos"}


class LabelledSample(Protocol):
    """What train_pq reads of a training item (``pipelines.labelled.LabelledItem`` is one)."""

    @property
    def item_id(self) -> str: ...
    @property
    def image(self) -> Image.Image | bytes | None: ...  # None: unreadable, see error
    @property
    def values(self) -> Mapping[str, float | None]: ...  # MOS column -> value (None = missing)
    @property
    def error(self) -> str | None: ...


@dataclass
class MosSample:
    """A training item built in code: ``MosSample("a.png", pil_image, {"mos": 3.2})``."""

    item_id: str
    image: Image.Image | bytes | None  # a PIL image or encoded bytes; None: unreadable (see error)
    values: dict[str, float | None]  # MOS column -> value; None or nan = missing
    error: str | None = None


@dataclass
class EpochStats:
    epoch: int  # 0 = before training
    lr: float  # learning rate at the end of the epoch
    train_loss: float  # mean loss over the epoch's steps (nan at epoch 0)
    srcc: float  # held-out SRCC of the selection score (p or overall) vs the overall MOS
    plcc: float  # held-out PLCC of the same
    srcc_p: float  # held-out SRCC of p (eq. 3) vs the overall MOS
    factor_srcc: dict[str, float] = field(default_factory=dict)  # held-out SRCC of each s_i vs its target

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "lr": self.lr, "train_loss": self.train_loss, "srcc": self.srcc,
                "plcc": self.plcc, "srcc_p": self.srcc_p, "factor_srcc": dict(self.factor_srcc)}


@dataclass
class TrainReport:
    out: Path  # the prompt file written (best epoch)
    n_train: int
    n_val: int
    initial_srcc: float  # held-out SRCC before training (epoch 0)
    best_srcc: float  # held-out SRCC at the best epoch
    best_epoch: int  # 0 when no epoch beat the starting contexts
    select: str  # "p" or "overall"
    init: str  # where the contexts started from
    trained_factors: list[str]
    history: list[EpochStats]
    skipped: list[tuple[str, str]]  # (item, reason) of items left out
    seconds: float
    val_items: list[str] = field(default_factory=list)  # names of the held-out items

    def to_json(self) -> dict:
        return {"out": str(self.out), "n_train": self.n_train, "n_val": self.n_val,
                "initial_srcc": self.initial_srcc, "best_srcc": self.best_srcc, "best_epoch": self.best_epoch,
                "select": self.select, "init": self.init, "trained_factors": list(self.trained_factors),
                "history": [h.to_json() for h in self.history],
                "skipped": [{"item": n, "reason": r} for n, r in self.skipped], "seconds": self.seconds,
                "val_items": list(self.val_items)}


# ----------------------------------------------------------------------------------------------
# Helpers


def _corr(x: np.ndarray, y: np.ndarray, rank: bool) -> float:
    """SRCC (rank=True) or PLCC; 0.0 when undefined (fewer than 3 items or a constant side)."""
    from scipy import stats

    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    with warnings.catch_warnings():  # near-constant inputs warn; the result is still defined
        warnings.simplefilter("ignore")
        r = (stats.spearmanr(x, y) if rank else stats.pearsonr(x, y))[0]
    return float(r) if np.isfinite(r) else 0.0


def _plcc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - PLCC over a batch (0 when the batch is too small or constant to define it)."""
    if pred.numel() < 3:
        return pred.new_zeros(())
    pc, tc = pred - pred.mean(), target - target.mean()
    denom = pc.norm() * tc.norm()
    if denom.item() < 1e-12:
        return pred.new_zeros(())
    return 1.0 - (pc * tc).sum() / denom


def _normalise_mos(col: np.ndarray, name: str) -> np.ndarray:
    finite = col[np.isfinite(col)]
    if finite.size == 0:
        raise InputError(f"MOS column {name!r} has no numeric values")
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        raise InputError(f"MOS column {name!r} is constant ({lo}); nothing to learn from")
    return (col - lo) / (hi - lo)


def _mos(value: object) -> float:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


@torch.no_grad()
def _cls_features(
    samples: Iterable[LabelledSample], columns: list[str], overall: str, clip: ClipBundle, encoder: SurgeryEncoder,
    image_size: int, feature_norm: str, max_pixels: int, batch_size: int, progress: bool, data_name: str,
) -> tuple[list[str], np.ndarray, torch.Tensor, list[tuple[str, str]]]:
    """One pass over the samples: names, raw MOS (N, C) in ``columns`` order and normalised CLS
    features (N, D) of the usable items (frozen image side), and the (item, reason) of the others."""
    from tqdm.auto import tqdm

    names: list[str] = []
    mos: list[list[float]] = []
    feats: list[torch.Tensor] = []
    skipped: list[tuple[str, str]] = []
    pending: list[tuple[str, list[float], Image.Image]] = []
    n_seen = n_with_mos = 0

    def flush() -> None:
        if not pending:
            return
        pixels = preprocess_images([im for _, _, im in pending], image_size, clip.mean, clip.std,
                                   device=clip.device, dtype=clip.dtype)  # (b, 3, S, S)
        f = normalise_features(encoder(pixels), feature_norm)[:, 0]  # (b, D), CLS as PQ-Map sees it
        feats.append(f.float().cpu())
        names.extend(n for n, _, _ in pending)
        mos.extend(m for _, m, _ in pending)
        pending.clear()

    bar = tqdm(total=len(samples) if isinstance(samples, Sized) else None, desc="image features", unit="img",
               disable=not progress)
    for sample in samples:
        n_seen += 1
        bar.update(1)
        name = sample.item_id
        row = [_mos(sample.values.get(c)) for c in columns]
        if not math.isfinite(row[columns.index(overall)]):
            skipped.append((name, f"overall MOS ({overall}) missing"))
            continue
        n_with_mos += 1
        image = sample.image
        if image is None and sample.error:
            skipped.append((name, f"{name}: {sample.error}"))
            continue
        try:
            if isinstance(image, Image.Image):
                img = image if image.mode == "RGB" else image.convert("RGB")
            else:
                img = decode_image(image, name=name, max_pixels=max_pixels)
        except GRefineError as e:
            skipped.append((name, str(e)))
            continue
        pending.append((name, row, img))
        if len(pending) >= batch_size:
            flush()
    flush()
    bar.close()
    if not feats:
        if n_with_mos == 0:
            raise InputError(f"{data_name}: MOS column {overall!r} has no numeric values ({n_seen} items read)")
        raise InputError(f"{data_name}: none of the {n_with_mos} images with an overall MOS could be decoded (first: {skipped[:1]})")
    return names, np.array(mos, dtype=np.float64).reshape(-1, len(columns)), torch.cat(feats), skipped


def _initial_prompts(init: str, preset: Preset, clip: ClipBundle) -> tuple[LearnedPrompts, str]:
    """"auto": the preset's learned prompt file when its width fits, else "X" placeholders."""
    width = text_width(clip.model)
    if init == "placeholder":
        return LearnedPrompts.from_placeholders(clip.model, clip.tokenizer), "placeholder"
    if init == "auto":
        if preset.pq.prompts != "zero-shot":
            prompts = LearnedPrompts.load(resolve_prompt_file(preset.pq.prompts))
            if prompts.width == width:
                prompts.check_model(clip.model)
                return prompts, f"prompt file {preset.pq.prompts}"
        return LearnedPrompts.from_placeholders(clip.model, clip.tokenizer), "placeholder"
    prompts = LearnedPrompts.load(resolve_prompt_file(init))
    prompts.check_model(clip.model)  # a width mismatch is an error naming both widths
    return prompts, f"prompt file {init}"


# ----------------------------------------------------------------------------------------------
# Training


def train_pq(
    samples: Iterable[LabelledSample],
    out: str | os.PathLike,
    preset: Preset | str = "sdxl",
    epochs: int = 50,
    lr: float = 2e-3,
    batch_size: int = 8,
    val_fraction: float = 0.2,
    seed: int = 0,
    mos_columns: Mapping[str, str] | None = None,
    init: str = "auto",
    unlabelled: str = "overall",
    select: str = "p",
    models_dir: str | os.PathLike | None = None,
    clip: ClipBundle | None = None,
    progress: bool = True,
    data_name: str = "samples",
) -> TrainReport:
    """Train the four PQ prompt contexts on MOS data; write the best (held-out SRCC) to ``out``.

    ``samples``: the training items, read once (``MosSample``s, or
    ``pipelines.labelled.load_training_samples(data, mos_columns)`` for files and folders); items
    without an overall MOS or with an unreadable image are skipped and listed in the report.
    ``data_name`` names the data in errors and in the prompt file's metadata.
    ``mos_columns`` maps factors to columns of ``values``, e.g. ``{"overall": "mos", "technical": "tech_mos"}``
    (``overall`` required; default ``{"overall": "mos"}``). ``init``: "auto" (the preset's prompt
    file when its width matches the model, else "X" placeholders), "placeholder", or a prompt
    name/path. ``unlabelled``: "overall" | "fixed" (factors without a MOS column). ``select``:
    "p" | "overall" (held-out SRCC used to pick the best epoch). ``clip``: an already loaded model
    (otherwise the preset's is loaded).
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    # 1. Check inputs
    if isinstance(samples, (str, os.PathLike)):
        raise TypeError(
            f"train_pq takes the training items, not a path ({samples!r}); read files with "
            "grefine_curate.pipelines.labelled.load_training_samples(data, mos_columns)"
        )
    preset = load_preset(preset) if isinstance(preset, str) else preset
    check_pq_config(preset.pq)
    mos_columns = dict(mos_columns or DEFAULT_MOS_COLUMNS)
    unknown = [f for f in mos_columns if f not in FACTORS]
    if unknown or "overall" not in mos_columns:
        raise ConfigError(
            f"mos_columns must map 'overall' (required) and optionally {list(FACTORS[1:])} to column names; "
            f"got {mos_columns}" + (f" (unknown factors {unknown})" if unknown else "")
        )
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise ConfigError(f"epochs must be >= 0, batch_size >= 1 and lr > 0; got {epochs}, {batch_size}, {lr}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1): a held-out split picks the best epoch; got {val_fraction}")
    if unlabelled not in ("overall", "fixed"):
        raise ConfigError(f"unlabelled must be 'overall' or 'fixed', got {unlabelled!r}")
    if select not in ("p", "overall"):
        raise ConfigError(f"select must be 'p' or 'overall', got {select!r}")
    out = Path(out)

    # 2. Model: frozen CLIP + surgery encoder, and the starting contexts (a width mismatch fails here,
    #    before any image is read)
    clip = clip if clip is not None else load_clip(preset.clip, models_dir=models_dir, seed=preset.seed)
    encoder = SurgeryEncoder(clip.model.visual, preset.clip.surgery_blocks)
    prompts, init_desc = _initial_prompts(init, preset, clip)
    prompts = prompts.to(clip.device)

    # 3. Data, read once: image features (the image side is frozen) and MOS of the usable items
    columns = list(dict.fromkeys(mos_columns.values()))
    names, raw_mos, feats, skipped = _cls_features(  # raw_mos (N, C), feats (N, D)
        samples, columns, mos_columns["overall"], clip, encoder, preset.clip.image_size, preset.pq.feature_norm,
        preset.max_pixels, batch_size=max(batch_size, 16), progress=progress, data_name=data_name)
    try:
        targets = {f: _normalise_mos(raw_mos[:, columns.index(c)], c)
                   for f, c in mos_columns.items()}  # factor -> (N,) in [0, 1]
    except InputError as e:
        raise InputError(f"{data_name}: {e}") from e
    n = len(names)
    n_val = max(3, int(round(n * val_fraction)))
    if n - n_val < 2:
        raise InputError(f"{data_name}: {n} usable items; need at least {n_val + 2} for a held-out split of {val_fraction}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    y = torch.stack([torch.as_tensor(targets.get(f, targets["overall"]), dtype=torch.float32)
                     if (f in targets or unlabelled == "overall") else torch.full((n,), math.nan)
                     for f in FACTORS], dim=1)  # (N, 4), nan = no target
    y_overall = torch.as_tensor(targets["overall"], dtype=torch.float32)  # (N,)
    feats = feats.to(clip.device)  # (N, D)

    # 4. Trainable contexts, the rest frozen
    trained = [f for f in FACTORS if f in mos_columns or unlabelled == "overall"]
    for f in FACTORS:
        prompts.ctx[f].requires_grad_(f in trained)
    params = [prompts.ctx[f] for f in trained]
    optim = torch.optim.Adam(params, lr=lr)
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=max(1, epochs * steps_per_epoch))
    scale, alphas, mode = preset.pq.logit_scale, preset.pq.alphas, preset.pq.alpha_mode
    unit_text = preset.pq.text_norm == "l2"  # train the prompts as PQ-Map will read them

    def scores(idx: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return good_probability(feats[idx.to(feats.device)][:, None], text, scale)[:, 0]  # (b, 4)

    def evaluate(epoch: int, train_loss: float) -> EpochStats:
        with torch.no_grad():
            s = scores(val_idx, prompts.features(clip.model, normalise=unit_text)).cpu()  # (V, 4)
        p = (cask(s, alphas, mode) if preset.pq.cask else s[:, 0]).numpy()
        yo = y_overall[val_idx].numpy()
        srcc_p = _corr(p, yo, rank=True)
        sel = p if select == "p" else s[:, 0].numpy()
        f_srcc = {f: _corr(s[:, j].numpy(), y[val_idx, j].numpy(), rank=True) for j, f in enumerate(FACTORS)
                  if torch.isfinite(y[val_idx, j]).any()}
        return EpochStats(epoch=epoch, lr=float(optim.param_groups[0]["lr"]), train_loss=train_loss,
                          srcc=_corr(sel, yo, rank=True), plcc=_corr(sel, yo, rank=False), srcc_p=srcc_p,
                          factor_srcc=f_srcc)

    def save(stats: EpochStats) -> None:
        prompts.save(out, extra_metadata={
            "source": f"train_pq on {data_name} (preset {preset.name}, CLIP {clip.name}), init: {init_desc}",
            "trained_epoch": str(stats.epoch), "val_srcc": f"{stats.srcc:.6f}", "val_plcc": f"{stats.plcc:.6f}",
            "select": select, "n_train": str(len(train_idx)), "n_val": str(n_val),
            "mos_columns": json.dumps(mos_columns), "clip": clip.name,
        })

    # 5. Epoch 0 = the starting contexts; then train, keeping the best held-out epoch
    history = [evaluate(0, math.nan)]
    best = history[0]
    save(best)
    bar = tqdm(range(1, epochs + 1), desc="train-pq", unit="epoch", disable=not progress)
    for epoch in bar:
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        losses = []
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            s = scores(idx, prompts.features(clip.model, normalise=unit_text))  # (b, 4) with gradients to the contexts
            target = y[idx].to(s.device)  # (b, 4)
            loss = s.new_zeros(())
            for j, f in enumerate(FACTORS):
                if f not in trained:
                    continue
                ok = torch.isfinite(target[:, j])
                if ok.sum() == 0:
                    continue
                pred, tgt = s[ok, j], target[ok, j]
                loss = loss + torch.mean((pred - tgt) ** 2) + _plcc_loss(pred, tgt)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            losses.append(float(loss.detach()))
        stats = evaluate(epoch, float(np.mean(losses)) if losses else math.nan)
        history.append(stats)
        if stats.srcc > best.srcc:
            best = stats
            save(best)
        bar.set_postfix(loss=f"{stats.train_loss:.4f}", srcc=f"{stats.srcc:.4f}", best=f"{best.srcc:.4f}@{best.epoch}")
    bar.close()
    return TrainReport(out=out, n_train=len(train_idx), n_val=n_val, initial_srcc=history[0].srcc,
                       best_srcc=best.srcc, best_epoch=best.epoch, select=select, init=init_desc,
                       trained_factors=trained, history=history, skipped=skipped,
                       seconds=time.perf_counter() - t_start,
                       val_items=[names[int(i)] for i in val_idx])
