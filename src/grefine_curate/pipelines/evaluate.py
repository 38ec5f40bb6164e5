"""`grefine-curate eval`: correlation of PQ-Map's p and AQ-Map's a with human scores.

Reproduces the protocol of the G-Refine paper's Tables 6 (PQ-Map vs perceptual MOS) and 7 (AQ-Map
vs alignment MOS), section 4.4: SRCC and PLCC (raw, and after the VQEG 4-parameter logistic) over
a data set with human mean opinion scores, e.g. Parquet exports of AIGIQA-20K or AGIQA-3K, here
with percentile-bootstrap 95% intervals (``pipelines/stats.py``).

Inputs are read by ``pipelines/labelled.iter_labelled``, found like the `run` job's (a Parquet
file, directory or glob, or an image folder with ``metadata.jsonl``/``metadata.csv``); MOS columns
are read beside the image and prompt. Scoring needs 224x224 inputs only, so JPEGs are decoded at
reduced scale (PIL draft mode, ``decode_image(draft_size=...)``): several times faster than a full
decode, with scores that move by far less than the reported precision (``bench/decode.py``).

Nothing is dropped silently: an unreadable image, a missing MOS, or an item without a prompt (for
``a``) is listed in the report with its reason.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from grefine_curate.curate.config import Preset, load_preset
from grefine_curate.curate.errors import ImageError, InputError
from grefine_curate.curate.images import decode_image
from grefine_curate.curate.results import ScoreResult
from grefine_curate.pipelines import stats
from grefine_curate.pipelines.labelled import iter_labelled
from grefine_curate.pipelines.work import Shard

# Paper anchors (SRCC / PLCC), shown under the table for orientation, each with what makes the
# paper's set-up differ from ours, so a user does not read them as a like-for-like target.
PAPER_TABLES = {
    "p": ("Table 6, PQ-Map", {"AIGIQA-20K": (0.7073, 0.6910), "AGIQA-3K": (0.7054, 0.7084)},
          "the paper trains the PQ prompts on AIGIQA-20K's training split; compare on its test split"),
    "a": ("Table 7, AQ-Map", {"AIGIQA-20K": (0.6117, 0.6797), "AGIQA-3K": (0.7303, 0.7862)},
          "not like for like: the paper's AQ-Map image encoder is initialised from ImageReward and "
          "fine-tuned on AIGIQA-20K; ours is zero-shot CLIP-Surgery, as the authors' released code"),
}
SCORE_LABELS = {"p": "PQ-Map p", "a": "AQ-Map a"}
MAX_LISTED_SKIPS = 200  # the JSON lists this many skipped items; the counts cover all of them


class Scorer(Protocol):
    def score(self, images: list, prompts: list[str | None]) -> list[ScoreResult]: ...


@dataclass
class EvalItem:
    name: str  # "<shard>#<row>" (Parquet) or the image's path relative to its folder
    data: bytes | None  # encoded image
    prompt: str | None
    mos: float | None
    align_mos: float | None


@dataclass
class Skipped:
    item: str
    reason: str

    def to_json(self) -> dict:
        return {"item": self.item, "reason": self.reason}


@dataclass
class ScoreEval:
    """One score (p or a) against one MOS column."""

    score: str  # "p" | "a"
    against: str  # the MOS column
    correlation: stats.Correlation
    values: np.ndarray = field(repr=False)  # (n,) the model's scores, for plots
    mos: np.ndarray = field(repr=False)  # (n,) the paired human scores

    def to_json(self) -> dict:
        return {"score": self.score, "against": self.against, **self.correlation.to_json()}


@dataclass
class EvalReport:
    data: list[str]
    preset: str
    clip_model: str
    mos_column: str
    align_mos_column: str | None
    n_items: int  # rows read
    n_scored: int  # items the model scored
    skipped: list[Skipped]
    scores: dict[str, ScoreEval]  # "p" and, with an alignment MOS column, "a"
    n_bootstrap: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def skip_reasons(self) -> dict[str, int]:
        return dict(Counter(_reason_kind(s.reason) for s in self.skipped).most_common())

    def to_json(self) -> dict:
        return {
            "data": list(self.data),
            "preset": self.preset,
            "clip_model": self.clip_model,
            "mos_column": self.mos_column,
            "align_mos_column": self.align_mos_column,
            "n_items": self.n_items,
            "n_scored": self.n_scored,
            "n_skipped": len(self.skipped),
            "skip_reasons": self.skip_reasons(),
            "skipped": [s.to_json() for s in self.skipped[:MAX_LISTED_SKIPS]],
            "scores": {k: v.to_json() for k, v in self.scores.items()},
            "n_bootstrap": self.n_bootstrap,
            "ci_level": 0.95,
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
        }


def _reason_kind(reason: str) -> str:
    """The reason without the item-specific detail, for counting ("missing MOS 'mos'", "cannot decode image")."""
    return reason.split(" (", 1)[0]


# ---------------------------------------------------------------------------------------------
# Reading items with their MOS


def iter_eval_items(
    data: str | Sequence[str],
    mos_column: str,
    align_mos_column: str | None = None,
    image_column: str | None = None,
    prompt_column: str | None = None,
    batch_rows: int = 256,
) -> tuple[list[Shard], Iterator[EvalItem]]:
    """Find the shards (checked up front, like `run`) and stream their items with MOS values."""
    items = iter_labelled(data, [c for c in (mos_column, align_mos_column) if c], image_column=image_column,
                          prompt_column=prompt_column, batch_rows=batch_rows)
    if align_mos_column:
        no_prompt = [s.path for s in items.shards if s.image_column is not None and s.prompt_column is None]
        if no_prompt:
            raise InputError(
                f"{no_prompt[0]}: --align-mos-column needs prompts, but no prompt column was found; "
                "pass --prompt-column NAME"
            )

    def eval_items() -> Iterator[EvalItem]:
        for it in items:
            yield EvalItem(name=it.item_id, data=it.image, prompt=it.prompt, mos=it.values[mos_column],
                           align_mos=it.values[align_mos_column] if align_mos_column else None)

    return items.shards, eval_items()


# ---------------------------------------------------------------------------------------------
# Scoring


def _score_batch(scorer: Scorer, batch: list[tuple[EvalItem, Any]], skipped: list[Skipped]) -> list[tuple[EvalItem, ScoreResult]]:
    """Score decoded items; a failing batch is retried item by item so one bad item costs only itself."""
    images = [img for _, img in batch]
    prompts = [it.prompt if it.prompt and it.prompt.strip() else None for it, _ in batch]
    try:
        return list(zip([it for it, _ in batch], scorer.score(images, prompts)))
    except (ValueError, RuntimeError) as batch_error:
        if len(batch) == 1:
            skipped.append(Skipped(batch[0][0].name, f"scoring failed ({type(batch_error).__name__}: {batch_error})"))
            return []
    out = []
    for pair in batch:
        out.extend(_score_batch(scorer, [pair], skipped))
    return out


def evaluate(
    data: str | Sequence[str],
    mos_column: str,
    align_mos_column: str | None = None,
    preset: Preset | str = "sdxl",
    prompts_file: str | None = None,
    models_dir: str | None = None,
    batch_size: int = 16,
    image_column: str | None = None,
    prompt_column: str | None = None,
    n_bootstrap: int = 1000,
    progress: bool = True,
    scorer: Scorer | None = None,
    seed: int = 0,
) -> EvalReport:
    """Score every item of ``data`` and correlate p with ``mos_column`` (and a with ``align_mos_column``).

    ``prompts_file`` replaces the preset's PQ prompts (a trained ``.safetensors`` from train-pq).
    ``scorer`` is any object with ``score(images, prompts) -> list[ScoreResult]``; by default the
    preset's ``QualityScorer``. Raises InputError for a missing column (naming the columns found) or
    when fewer than 3 items could be scored.
    """
    # 1. Check inputs
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(preset, str):
        preset = load_preset(preset)
    if prompts_file:
        preset = dataclasses.replace(preset, pq=dataclasses.replace(preset.pq, prompts=str(prompts_file)))
    shards, items = iter_eval_items(data, mos_column, align_mos_column, image_column, prompt_column)
    t0 = time.perf_counter()

    # 2. Build the scorer (after the input checks: a bad column fails before models load)
    if scorer is None:
        from grefine_curate.curate.scorer import QualityScorer

        scorer = QualityScorer(preset, models_dir=models_dir)
    draft = (preset.clip.image_size, preset.clip.image_size)  # scoring needs no more pixels than this

    # 3. Decode (reduced-size JPEG decode) and score in batches
    skipped: list[Skipped] = []
    scored: list[tuple[EvalItem, ScoreResult]] = []
    n_items = 0
    total = sum(s.num_rows for s in shards)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="eval", leave=False)
    pending: list[tuple[EvalItem, Any]] = []
    for it in items:
        n_items += 1
        if bar is not None:
            bar.update(1)
        if it.mos is None:
            skipped.append(Skipped(it.name, f"missing MOS {mos_column!r} (null or not a number)"))
            continue
        try:
            img = decode_image(it.data, name=it.name, max_pixels=preset.max_pixels, draft_size=draft)
        except ImageError as e:
            detail = str(e).removeprefix(f"{it.name}: ")  # the item is named once, in the listing
            skipped.append(Skipped(it.name, f"cannot decode image ({detail})"))
            continue
        pending.append((it, img))
        if len(pending) >= batch_size:
            scored.extend(_score_batch(scorer, pending, skipped))
            pending = []
    if pending:
        scored.extend(_score_batch(scorer, pending, skipped))
    if bar is not None:
        bar.close()

    # 4. Correlate
    notes: list[str] = []
    if preset.clip.model == "tiny":
        notes.append("tiny preset: random-weight models, the correlations carry no meaning")
    if len(scored) < stats.MIN_ITEMS:
        reasons = Counter(_reason_kind(s.reason) for s in skipped).most_common(3)
        raise InputError(
            f"only {len(scored)} of {n_items} items could be scored; at least {stats.MIN_ITEMS} are needed. "
            f"Most frequent reasons: {'; '.join(f'{r} x{c}' for r, c in reasons) or 'no items in the input'}"
        )
    results: dict[str, ScoreEval] = {}
    p = np.array([r.p for _, r in scored], dtype=np.float64)
    m = np.array([it.mos for it, _ in scored], dtype=np.float64)
    results["p"] = ScoreEval("p", mos_column, stats.correlate(p, m, n_boot=n_bootstrap, seed=seed), p, m)
    if align_mos_column:
        pairs = [(r.a, it.align_mos) for it, r in scored if r.a is not None and it.align_mos is not None]
        n_no_prompt = sum(1 for _, r in scored if r.a is None)
        n_no_mos = sum(1 for it, r in scored if r.a is not None and it.align_mos is None)
        if n_no_prompt:
            notes.append(f"a: {n_no_prompt} scored items have no prompt (no AQ score) and are left out")
        if n_no_mos:
            notes.append(f"a: {n_no_mos} scored items have no {align_mos_column!r} value and are left out")
        if len(pairs) < stats.MIN_ITEMS:
            raise InputError(
                f"only {len(pairs)} items have both a prompt and an {align_mos_column!r} value; "
                f"at least {stats.MIN_ITEMS} are needed for the AQ-Map correlation (check --prompt-column)"
            )
        a, am = (np.array(v, dtype=np.float64) for v in zip(*pairs))
        results["a"] = ScoreEval("a", align_mos_column, stats.correlate(a, am, n_boot=n_bootstrap, seed=seed), a, am)

    return EvalReport(
        data=[data] if isinstance(data, str) else list(data),
        preset=preset.name,
        clip_model=_clip_name(scorer, preset),
        mos_column=mos_column,
        align_mos_column=align_mos_column,
        n_items=n_items,
        n_scored=len(scored),
        skipped=skipped,
        scores=results,
        n_bootstrap=n_bootstrap,
        seconds=time.perf_counter() - t0,
        notes=notes,
    )


def _clip_name(scorer: Any, preset: Preset) -> str:
    clip = getattr(scorer, "clip", None)
    name = getattr(clip, "name", None)
    if name:
        return str(name)
    return f"{preset.clip.model}/{preset.clip.checkpoint or preset.clip.pretrained or 'random'}"


# ---------------------------------------------------------------------------------------------
# Presentation


def _fmt(v: float) -> str:
    return "   n/a" if v is None or not math.isfinite(v) else f"{v:.4f}"


def _fmt_ci(ci: tuple[float, float]) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def format_table(report: EvalReport) -> str:
    """The result as a text table in the layout of the paper's Tables 6 and 7, with 95% intervals."""
    lines = [
        f"data: {', '.join(report.data)}",
        f"preset: {report.preset}   CLIP: {report.clip_model}   items: {report.n_items} read, "
        f"{report.n_scored} scored, {len(report.skipped)} skipped",
        "",
    ]
    head = f"{'Method':<12} {'vs':<16} {'n':>6}   {'SRCC':>6} {'[95% CI]':<18}  {'PLCC':>6} {'[95% CI]':<18}  {'PLCC*':>6} {'[95% CI]':<18}"
    lines += [head, "-" * len(head)]
    for key, ev in report.scores.items():
        c = ev.correlation
        lines.append(
            f"{SCORE_LABELS[key]:<12} {ev.against[:16]:<16} {c.n:>6}   {_fmt(c.srcc):>6} {_fmt_ci(c.srcc_ci95):<18}  "
            f"{_fmt(c.plcc):>6} {_fmt_ci(c.plcc_ci95):<18}  {_fmt(c.plcc_fitted):>6} {_fmt_ci(c.plcc_fitted_ci95):<18}"
        )
    lines += ["", f"PLCC* = PLCC after the 4-parameter logistic fit (VQEG), signed by the fitted curve's direction; "
                  f"intervals: percentile bootstrap, {report.n_bootstrap} resamples."]
    for key in report.scores:
        title, rows, caveat = PAPER_TABLES[key]
        lines.append(f"paper {title} (SRCC/PLCC): " + "; ".join(f"{db} {s:.4f}/{p:.4f}" for db, (s, p) in rows.items())
                     + f" ({caveat})")
    if report.skipped:
        lines += ["", f"skipped {len(report.skipped)} item(s): "
                  + "; ".join(f"{r} x{n}" for r, n in report.skip_reasons().items())]
        for s in report.skipped[:10]:
            lines.append(f"  {s.item}: {s.reason}")
        if len(report.skipped) > 10:
            lines.append(f"  ... {len(report.skipped) - 10} more (see --json)")
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
