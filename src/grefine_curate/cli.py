"""Command line of grefine-curate (Typer).

Parses options, builds configs, calls pipelines/ and curate/, and maps domain errors to exit codes
once, here at the edge:

    0  done
    1  failure (a model could not be loaded, an unexpected error)
    2  bad usage, config or input (the message names what and how to fix it)
    3  `run`/`score` finished but the error rate exceeded --max-error-rate
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from grefine_curate import __version__


def _plain_help_types() -> None:
    """Typer 0.2x writes every parameter's Python type into help: `<bool>` after a flag, which takes
    no value, and `<list[str]>` after a variadic argument, whose name already says it. Drop those two
    (other types, `<int>`, `<path>`, stay). A no-op on Typer versions without these hooks."""
    from typer import core

    def patch(cls, drop):
        show = getattr(cls, "display_type_rich", None)
        if show is None or getattr(show, "_grefine", False):
            return

        def display_type_rich(self, ctx):
            return None if drop(self) else show(self, ctx)

        display_type_rich._grefine = True
        cls.display_type_rich = display_type_rich

    patch(core.TyperOption, lambda p: p.is_flag)
    patch(core.TyperArgument, lambda p: p.nargs != 1)


_plain_help_types()
app = typer.Typer(
    name="grefine-curate",
    help="Curate AI-generated images with G-Refine: score perceptual (PQ-Map) and alignment (AQ-Map) "
    "quality, and refine low-quality images with map-guided diffusion.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="List and download the model weights a preset needs.", no_args_is_help=True)
app.add_typer(models_app, name="models")
prompts_app = typer.Typer(help="Manage PQ-Map prompt files.", no_args_is_help=True)
app.add_typer(prompts_app, name="prompts")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_ERROR_RATE = 0, 1, 2, 3

PresetOpt = Annotated[str, typer.Option("--preset", "-p", help="Preset name (sdxl, sd15, tiny, reference: the authors' scripts) or path to a preset .toml.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="TOML file overriding preset values (same tables as a preset).")]
ModelsDirOpt = Annotated[Optional[Path], typer.Option("--models-dir", help="Local model cache (from `models pull`), for machines without internet.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a human summary.")]
RandomOpt = Annotated[bool, typer.Option(
    "--random-weights",
    help="Benchmark and wiring check: build the preset's full-size models (CLIP and both diffusion "
    "pipelines) with random weights, no download. Outputs carry no quality meaning.")]

# What --random-weights changes in a preset (random CLIP of the same architecture; diffusion models
# from configs/arch); recorded in the manifest like any other config value.
RANDOM_WEIGHTS = {"clip": {"pretrained": "", "checkpoint": None}, "refiner": {"random_weights": True}}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"grefine-curate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """grefine-curate: G-Refine quality maps and refinement for AI-generated image data sets."""


def _fail(message: str, code: int) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _preset(name: str, config: Path | None, extra: dict | None = None):
    from grefine_curate.curate.config import resolve_preset

    return resolve_preset(name, config, extra)


def _write(path: Path, data: bytes) -> None:
    """Write an output file of a single-image command, creating its folder; errors name the path."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as e:
        _fail(f"cannot write {path}: {e.strerror or e}", EXIT_USAGE)


# Formats image files are written in, by the file's extension (the bytes must match what the name says).
OUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _out_format(path: Path, option: str) -> str:
    fmt = OUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        _fail(f"{option} {path}: cannot tell the image format from {path.suffix or 'a name without extension'!r}; "
              f"end the name with one of {', '.join(OUT_FORMATS)}", EXIT_USAGE)
    return fmt


def _map_bytes(m, fmt: str, size: tuple[int, int] | None = None, binary: bool = False) -> bytes:
    """A map in [0, 1] as 8-bit grey in ``fmt`` (PNG keeps it exact), at ``size`` (W, H) when given:
    maps are computed at most the preset's map_max_side long, files are written at the image's size
    (bilinear; a mask nearest, so it stays black and white)."""
    import numpy as np
    from PIL import Image

    from grefine_curate.curate.images import encode_image

    m = np.asarray(m, dtype=np.float32)
    if size is not None and (m.shape[1], m.shape[0]) != tuple(size):
        m = np.asarray(Image.fromarray(m, "F").resize(size, Image.NEAREST if binary else Image.BILINEAR))
    arr = np.clip(m * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return encode_image(Image.fromarray(arr, "L"), fmt)


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=float))


def _load_one(image: Path, preset):
    from grefine_curate.curate.images import load_image

    return load_image(image, max_pixels=preset.max_pixels)


def _scorer(preset, models_dir: Path | None):
    from grefine_curate.curate.scorer import QualityScorer

    return QualityScorer(preset, models_dir=models_dir)


def _overrides(random_weights: bool = False, prompts: Path | None = None) -> dict | None:
    """Nested preset overrides from command-line switches (None when there are none)."""
    out: dict = dict(RANDOM_WEIGHTS) if random_weights else {}
    if prompts:
        out["pq"] = {"prompts": str(prompts)}
    return out or None


def _warn_tiny(preset, quiet: bool = False) -> None:
    if quiet:
        return
    if preset.clip.model == "tiny":
        typer.secho("note: the tiny preset uses random weights; its scores carry no quality meaning.", err=True, fg=typer.colors.YELLOW)
    elif preset.refiner.random_weights and not preset.clip.pretrained and not preset.clip.checkpoint:
        typer.secho(f"note: --random-weights: the {preset.name} architectures with random weights (a benchmark "
                    "and wiring check); scores, maps and images carry no quality meaning.", err=True,
                    fg=typer.colors.YELLOW)


# --------------------------------------------------------------------------------------------- #
# Single-image commands
# --------------------------------------------------------------------------------------------- #


@app.command()
def pq(
    image: Annotated[Path, typer.Argument(help="Image file to score.")],
    preset: PresetOpt = "sdxl",
    config: ConfigOpt = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="PQ prompt file (.safetensors from train-pq) instead of the preset's.")] = None,
    save_map: Annotated[Optional[Path], typer.Option("--save-map", help="Write the PQ map as an 8-bit grey image of the image's size (white = good); .png (exact), .jpg or .webp.")] = None,
    models_dir: ModelsDirOpt = None,
    random_weights: RandomOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Perceptual quality of one image: score p, the four factor scores, and the PQ map."""
    map_fmt = _out_format(save_map, "--save-map") if save_map else None  # before any model loads
    cfg = _preset(preset, config, _overrides(random_weights, prompts))
    _warn_tiny(cfg)
    img = _load_one(image, cfg)
    result = _scorer(cfg, models_dir).score_pq([img])[0]
    if save_map:
        _write(save_map, _map_bytes(result.P, map_fmt, img.size))
    if as_json:
        _print_json({"image": str(image), "p": result.p, "factors": result.factors,
                     "width": img.width, "height": img.height, "map": str(save_map) if save_map else None})
        return
    typer.echo(f"{image}: p = {result.p:.4f}")
    for name, value in result.factors.items():
        typer.echo(f"  {name:<12} {value:.4f}")
    if save_map:
        typer.echo(f"map written to {save_map}")


@app.command()
def aq(
    image: Annotated[Path, typer.Argument(help="Image file to score.")],
    prompt: Annotated[str, typer.Option("--prompt", help="The prompt the image was generated from.")],
    preset: PresetOpt = "sdxl",
    config: ConfigOpt = None,
    save_map: Annotated[Optional[Path], typer.Option("--save-map", help="Write the AQ map as an 8-bit grey image of the image's size (white = needs refinement); .png (exact), .jpg or .webp.")] = None,
    models_dir: ModelsDirOpt = None,
    random_weights: RandomOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Alignment quality of one image with its prompt: score a, per-phrase scores and defects, the AQ map."""
    map_fmt = _out_format(save_map, "--save-map") if save_map else None  # before any model loads
    cfg = _preset(preset, config, _overrides(random_weights))
    _warn_tiny(cfg)
    img = _load_one(image, cfg)
    result = _scorer(cfg, models_dir).score([img], [prompt])[0].aq
    if result is None:
        _fail(f"the prompt {prompt!r} is empty after cleaning (see `grefine-curate parse`); AQ-Map needs text", EXIT_USAGE)
    if save_map:
        _write(save_map, _map_bytes(result.A, map_fmt, img.size))
    if as_json:
        _print_json({"image": str(image), "prompt": prompt, **result.to_json(), "map": str(save_map) if save_map else None})
        return
    _print_aq(image, result)
    if save_map:
        typer.echo(f"map written to {save_map}")


def _print_aq(image, result) -> None:
    typer.echo(f"{image}: a = {result.a:.4f} (clip score {result.clip_score:.4f})")
    for i, ph in enumerate(result.phrases):
        flag = f"  <- {ph.defect}" if ph.defect else ""
        typer.echo(f"  [{i}] {ph.text!r:<32} noun={ph.noun!r:<14} parent={ph.parent} a_pns={ph.a_pns:.3f} a_phs={ph.a_phs:.3f}{flag}")
    typer.echo(f"  refinement prompt: {result.emphasised_prompt}")


@app.command("score-image")
def score_image(
    image: Annotated[Path, typer.Argument(help="Image file to score.")],
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="The prompt (omit for PQ only).")] = None,
    preset: PresetOpt = "sdxl",
    config: ConfigOpt = None,
    models_dir: ModelsDirOpt = None,
    random_weights: RandomOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """PQ-Map and AQ-Map of one image in one CLIP forward, and the route the job would take."""
    from grefine_curate.curate.routing import choose_route

    cfg = _preset(preset, config, _overrides(random_weights))
    _warn_tiny(cfg)
    img = _load_one(image, cfg)
    res = _scorer(cfg, models_dir).score([img], [prompt])[0]
    route = choose_route(res.pq.p, None if res.aq is None else res.aq.a, cfg.routing)
    if as_json:
        _print_json({"image": str(image), "prompt": prompt, "pq": res.pq.to_json(),
                     "aq": None if res.aq is None else res.aq.to_json(), "route": route})
        return
    typer.echo(f"{image}: p = {res.pq.p:.4f}  " + "  ".join(f"{k}={v:.3f}" for k, v in res.pq.factors.items()))
    if res.aq is not None:
        _print_aq(image, res.aq)
    typer.echo(f"route: {route}")


@app.command()
def parse(
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts to parse.")],
    preset: PresetOpt = "sdxl",
    spacy_model: Annotated[Optional[str], typer.Option("--spacy-model", help="spaCy pipeline name (default: the preset's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list with one object per prompt.")] = False,
) -> None:
    """Split prompts into phrases (AQ-Map's syntax step): phrases, nouns, parents, modifiers set aside, and the tree."""
    from grefine_curate.curate.syntax import load_spacy, parse_prompts

    cfg = _preset(preset, None)
    aq = cfg.aq
    parsed = parse_prompts(prompts, load_spacy(spacy_model or aq.spacy_model), aq.max_phrases,
                           modifiers=aq.modifiers, noun=aq.noun, parents=aq.parents)
    if as_json:
        typer.echo(json.dumps([p.to_json() for p in parsed], indent=2, ensure_ascii=False))
        return
    for p in parsed:
        typer.echo(p.describe())
        typer.echo("")


@app.command()
def refine(
    image: Annotated[Path, typer.Argument(help="Image file to refine.")],
    prompt: Annotated[str, typer.Option("--prompt", help="The prompt the image was generated from.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the result, at the original's size; the "
                                      "format follows the extension (.png, .jpg/.jpeg, .webp).")],
    preset: PresetOpt = "sdxl",
    config: ConfigOpt = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed (default: derived from the preset seed and the file name).")] = None,
    save_mask: Annotated[Optional[Path], typer.Option("--save-mask", help="Write the low-quality mask (what stage 1 inpaints on route full) as a black and white image (.png, .jpg or .webp).")] = None,
    models_dir: ModelsDirOpt = None,
    random_weights: RandomOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No notes on stderr (errors are still printed).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Score, route and refine one image (stage 1 inpaint on the low-quality mask, stage 2 light pass, guard)."""
    import numpy as np

    from grefine_curate.curate.images import encode_image
    from grefine_curate.curate.refiner import BalancedRefiner, RefineItem, item_seed

    fmt = _out_format(out, "--out")  # before any model loads
    mask_fmt = _out_format(save_mask, "--save-mask") if save_mask else None
    cfg = _preset(preset, config, _overrides(random_weights))
    _warn_tiny(cfg, quiet)
    img = _load_one(image, cfg)
    scorer = _scorer(cfg, models_dir)
    res = scorer.score([img], [prompt])[0]
    refiner = BalancedRefiner(cfg.refiner, cfg.routing, rescore=scorer.rescore, models_dir=models_dir)
    item = RefineItem(
        image=img, prompt=res.aq.emphasised_prompt if res.aq else prompt, p=res.pq.p,
        a=None if res.aq is None else res.aq.a, P=res.pq.P, A=None if res.aq is None else res.aq.A,
        seed=seed if seed is not None else item_seed(cfg.seed, image.name),
        score_prompt=prompt,  # the guard compares against the original prompt, not the emphasised one
    )
    outcome = refiner.refine([item])[0]
    _write(out, encode_image(outcome.image, fmt))
    if save_mask and outcome.mask is not None:
        _write(save_mask, _map_bytes(np.asarray(outcome.mask, dtype=np.float32), mask_fmt, img.size, binary=True))
    # On skip the image is the input, so its scores after are the input's (as in the job's output).
    p_after = outcome.p_after if outcome.p_after is not None else res.pq.p
    a_after = outcome.a_after if outcome.a_after is not None else item.a
    # The refiner's mask_area is the low-quality mask's own area on every route; the stage-1 mask is
    # what stage 1 inpainted, so it is empty unless stage 1 ran (route full, or full then reverted).
    stage1_area = outcome.mask_area if outcome.steps_run.get("stage1", 0) > 0 else 0.0
    report = {
        "image": str(image), "out": str(out), "route": outcome.route, "seed": item.seed,
        "p": res.pq.p, "a": item.a, "p_after": p_after, "a_after": a_after,
        "mask_area": stage1_area, "lq_mask_area": outcome.mask_area, "steps_run": outcome.steps_run,
        "unmatched_phrases": res.aq.unmatched if res.aq else [], "refinement_prompt": item.prompt,
    }
    if as_json:
        _print_json(report)
        return
    typer.echo(f"{image} -> {out}: route {outcome.route}, stage-1 mask area {stage1_area:.1%}")
    typer.echo(f"  p {res.pq.p:.4f} -> {p_after:.4f}")
    if item.a is not None:
        typer.echo(f"  a {item.a:.4f} -> {a_after:.4f}")


# --------------------------------------------------------------------------------------------- #
# Training, evaluation, reports
# --------------------------------------------------------------------------------------------- #


@app.command("train-pq")
def train_pq(
    data: Annotated[list[str], typer.Argument(help="Parquet files/dirs/globs or image folders (metadata.csv/jsonl) with MOS columns.")],
    out: Annotated[Path, typer.Option("--out", help="Output prompt file (.safetensors); use it with --prompts or pq.prompts.")],
    mos: Annotated[Optional[list[str]], typer.Option("--mos", metavar="FACTOR=COLUMN", help="Factor and its MOS column (overall, technical, rationality, naturalness); repeatable. Default: overall=mos.")] = None,
    image_column: Annotated[Optional[str], typer.Option("--image-column", help="Image column (bytes or {bytes,path}) for Parquet data (default: auto).")] = None,
    preset: PresetOpt = "sdxl",
    config: ConfigOpt = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs (paper: 50).")] = 50,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate (cosine annealed).")] = 2e-3,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size.")] = 8,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Held-out fraction.")] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Split and init seed.")] = 0,
    init: Annotated[str, typer.Option("--init", help="auto (the preset's prompts when widths match), placeholder, or a prompt file.")] = "auto",
    unlabelled: Annotated[str, typer.Option("--unlabelled", help="Factors without a MOS column: 'overall' (train on overall MOS) or 'fixed'.")] = "overall",
    select: Annotated[str, typer.Option("--select", help="Best epoch by held-out SRCC of 'p' or of 'overall'.")] = "p",
    models_dir: ModelsDirOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the four PQ prompt contexts (image encoder frozen) on images with human MOS."""
    from grefine_curate.curate.train_pq import train_pq as run_training
    from grefine_curate.pipelines.labelled import load_training_samples

    cfg = _preset(preset, config)
    columns = {"overall": "mos"}
    for item in mos or []:
        if "=" not in item:
            _fail(f"--mos expects FACTOR=COLUMN (e.g. overall=mos_quality), got {item!r}", EXIT_USAGE)
        k, v = item.split("=", 1)
        columns[k.strip()] = v.strip()
    samples = load_training_samples(data, columns, image_column=image_column)  # streamed, decoded per batch
    report = run_training(samples, out, cfg, epochs=epochs, lr=lr, batch_size=batch_size,
                          val_fraction=val_fraction, seed=seed, mos_columns=columns,
                          init=init, unlabelled=unlabelled, select=select, models_dir=models_dir,
                          progress=not quiet, data_name=", ".join(data))
    if as_json:
        _print_json(report.to_json())
        return
    typer.echo(f"trained on {report.n_train} images, {report.n_val} held out; held-out SRCC "
               f"{report.initial_srcc:.4f} -> {report.best_srcc:.4f} (best epoch {report.best_epoch})")
    typer.echo(f"prompts written to {report.out}")


@prompts_app.command("import")
def prompts_import(
    folder: Annotated[Path, typer.Argument(help="Folder with PQ-overall.pth, PQ-technical.pth, PQ-rational.pth, PQ-natural.pth (CLIP-IQA+ checkpoints).")],
    out: Annotated[Path, typer.Option("--out", help="Output prompt file (.safetensors).")],
) -> None:
    """Convert released CLIP-IQA+ prompt checkpoints (G-Refine's PQ-*.pth) to a prompt file (safe loading only)."""
    from grefine_curate.curate.prompts import import_clipiqa_checkpoint

    path = import_clipiqa_checkpoint(folder, out, source=str(folder))
    typer.echo(f"prompt file written to {path}")


@app.command("eval")
def eval_cmd(
    data: Annotated[list[str], typer.Argument(help="Parquet file/dir/glob or image folder with human scores.")],
    mos_column: Annotated[str, typer.Option("--mos-column", help="Perceptual MOS column (compared with p).")],
    align_mos_column: Annotated[Optional[str], typer.Option("--align-mos-column", help="Alignment MOS column (compared with a).")] = None,
    preset: PresetOpt = "sdxl",
    config: ConfigOpt = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="PQ prompt file instead of the preset's.")] = None,
    image_column: Annotated[Optional[str], typer.Option("--image-column", help="Image column (default: auto).")] = None,
    prompt_column: Annotated[Optional[str], typer.Option("--prompt-column", help="Prompt column (default: auto).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward.")] = 16,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples for the 95% intervals.")] = 1000,
    models_dir: ModelsDirOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """SRCC/PLCC of PQ-Map's p and AQ-Map's a against human scores (like the paper's Tables 6 and 7)."""
    from grefine_curate.pipelines.evaluate import evaluate, format_table

    cfg = _preset(preset, config, {"pq": {"prompts": str(prompts)}} if prompts else None)
    _warn_tiny(cfg, quiet)
    report = evaluate(data, mos_column=mos_column, align_mos_column=align_mos_column, preset=cfg,
                      models_dir=models_dir, batch_size=batch_size, image_column=image_column,
                      prompt_column=prompt_column, n_bootstrap=bootstrap, progress=not quiet)
    if as_json:
        _print_json(report.to_json())
    else:
        typer.echo(format_table(report))


@app.command()
def report(
    out: Annotated[str, typer.Argument(help="Output folder of a `run` or `score` job (local path or URI).")],
    worst: Annotated[int, typer.Option("--worst", help="How many of the worst items to show.")] = 24,
    best: Annotated[int, typer.Option("--best", help="How many of the best items to show.")] = 12,
    per_route: Annotated[int, typer.Option("--per-route", help="Items shown on each route's page (worst first).")] = 12,
    table_rows: Annotated[int, typer.Option("--table-rows", help="Rows of the filterable item table (worst first).")] = 2000,
) -> None:
    """(Re)write OUT/__grefine__/report.html: counts, thresholds, histograms, worst and best items with their maps,
    a page per route, a filter by phrase, score range and route, unmatched phrases, each item's place in OUT."""
    from grefine_curate.pipelines.report import write_report

    path = write_report(out, n_worst=worst, n_best=best, n_route=per_route, n_table=table_rows)
    typer.echo(f"report written to {path}")


@app.command("export")
def export_cmd(
    out: Annotated[str, typer.Argument(help="Output folder of a `run` or `score` job.")],
    to: Annotated[str, typer.Option("--to", help="New (or empty) folder to write the data set to: a local path or a URI (s3://bucket/prefix).")],
    where: Annotated[Optional[str], typer.Option("--where", help="Keep only rows matching this condition: comparisons COLUMN OP VALUE (< <= > >= == !=; a number, 'text' or null) with and/or/not and parentheses, e.g. \"pq_score_after >= 0.6 and grefine_route != 'reverted'\".")] = None,
    fmt: Annotated[str, typer.Option("--format", help="parquet (Hugging Face image structs), webdataset (.tar shards) or imagefolder (files + metadata.jsonl).")] = "parquet",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Write a job's output as a clean training data set: final images, input columns and scores; error rows
    (and rows not matching --where) left out and counted."""
    from grefine_curate.pipelines.export import export as run_export

    summary = run_export(out, to, where=where, fmt=fmt, quiet=quiet)
    for line in summary.lines():
        typer.echo(line)


# --------------------------------------------------------------------------------------------- #
# The job
# --------------------------------------------------------------------------------------------- #


def _job(options: dict) -> None:
    """Run or score: the command's options are the JobOptions fields (one object for both commands),
    plus the switches that become preset overrides."""
    from grefine_curate.pipelines.job import JobOptions, run_job

    opts = dict(options)
    random_weights, prompts = opts.pop("random_weights", False), opts.pop("prompts", None)
    opts["inputs"] = list(opts["inputs"])
    opts["config_file"] = str(opts.pop("config")) if opts.get("config") else opts.pop("config", None)
    opts["models_dir"] = str(opts["models_dir"]) if opts.get("models_dir") else None
    opts["image_format"] = opts.get("image_format", "PNG").upper()
    opts["allow_paths"] = list(opts.get("allow_paths") or []) or None
    opts["overrides"] = _overrides(random_weights, prompts)
    job = JobOptions(**opts)
    if random_weights and not job.quiet:
        typer.secho("note: --random-weights: full-size architectures with random weights (a benchmark and wiring "
                    "check); scores, maps and images carry no quality meaning.", err=True, fg=typer.colors.YELLOW)
    summary = run_job(job)
    for line in summary.lines():
        typer.echo(line, err=summary.exit_code != 0)
    raise typer.Exit(summary.exit_code)


InputsArg = Annotated[list[str], typer.Argument(help="Parquet shards, WebDataset .tar shards, image folders or Hugging Face save_to_disk folders (a file, a directory searched recursively, or a glob); local paths or s3:// / gs:// URIs.")]
OutOpt = Annotated[str, typer.Option("--out", "-o", help="Output folder: a local path or a URI (s3://bucket/prefix, gs://...); never folded into a local path.")]
ExecutorOpt = Annotated[str, typer.Option("--executor", help="ray (default; local instance or a cluster) or local (in-process).")]
AddressOpt = Annotated[Optional[str], typer.Option("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance).")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", help="Ray actors (default: one per GPU; on a CPU-only cluster its CPUs // 4, at least 1).")]
GpusOpt = Annotated[float, typer.Option("--gpus-per-worker", help="GPUs per Ray actor (fractions share a GPU).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Images per model batch.")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Process only the first N items (for trials).")]
MapsOpt = Annotated[bool, typer.Option("--save-maps", help="Store 64x64 PQ/AQ maps in the output rows.")]
ResumeOpt = Annotated[bool, typer.Option("--resume/--no-resume", help="Skip shards whose output is complete (default), or recompute all (a config change is then accepted: every row is rewritten).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Accept a config change (or a smaller --limit) against OUT's earlier run: every shard is recomputed with this config, rows beyond the new limit are removed.")]
ErrRateOpt = Annotated[float, typer.Option("--max-error-rate", help="Exit 3 when more than this fraction of items failed (the outputs are still complete).")]
ImageFormatOpt = Annotated[str, typer.Option("--image-format", help="Encoding of refined images in Parquet outputs: PNG, JPEG or WEBP.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
KeepOpt = Annotated[bool, typer.Option("--keep-images", help="Score mode: also copy the image bytes to the output.")]
InputColsOpt = Annotated[bool, typer.Option("--input-columns/--no-input-columns", help="Score mode, Parquet input: keep the input's other columns (ids, licences, ...) beside the scores (default), or write only ids, prompts and scores.")]
ImgColOpt = Annotated[Optional[str], typer.Option("--image-column", help="Image column of a table input (default: auto: image, img, jpg, jpeg, png, webp, image_bytes).")]
PromptColOpt = Annotated[Optional[str], typer.Option("--prompt-column", help="Prompt column of a table input (default: auto: prompt, text, caption, txt).")]
IdColOpt = Annotated[Optional[str], typer.Option("--id-column", help="Id column of a table input (default: auto: id, key, uid; else shard name + row index).")]
PromptsOpt = Annotated[Optional[Path], typer.Option("--prompts", help="PQ prompt file (.safetensors from train-pq) instead of the preset's (as pq and eval take it).")]
AllowPathsOpt = Annotated[Optional[list[str]], typer.Option("--allow-paths", metavar="DIR", help="A folder (repeatable) that image paths in the data may name besides the input's own folder; other paths are error rows naming them.")]
WaitLockOpt = Annotated[float, typer.Option("--wait-lock", help="Seconds to wait when another job holds --out (default 0: refuse at once, naming it).")]
UnitRowsOpt = Annotated[Optional[int], typer.Option("--unit-rows", help="Rows per work unit (whole Parquet row groups; the unit of scheduling, retry and resume). Default: the preset's.")]


@app.command()
def run(
    inputs: InputsArg,
    out: OutOpt,
    mode: Annotated[str, typer.Option("--mode", help="refine (score, route, refine) or score (audit only).")] = "refine",
    preset: PresetOpt = "sdxl",
    config: ConfigOpt = None,
    executor: ExecutorOpt = "ray",
    address: AddressOpt = None,
    workers: WorkersOpt = None,
    gpus_per_worker: GpusOpt = 1.0,
    batch_size: BatchOpt = 8,
    limit: LimitOpt = None,
    save_maps: MapsOpt = False,
    resume: ResumeOpt = True,
    force: ForceOpt = False,
    max_error_rate: ErrRateOpt = 0.1,
    quiet: QuietOpt = False,
    keep_images: KeepOpt = False,
    input_columns: InputColsOpt = True,
    image_column: ImgColOpt = None,
    prompt_column: PromptColOpt = None,
    id_column: IdColOpt = None,
    models_dir: ModelsDirOpt = None,
    image_format: ImageFormatOpt = "PNG",
    random_weights: RandomOpt = False,
    scores: Annotated[Optional[str], typer.Option("--scores", help="Reuse p, a and unmatched phrases (and maps) from the OUT of an earlier `score` run over the same inputs and scoring config, instead of scoring again: only the images to refine are decoded.")] = None,
    refine_worst: Annotated[Optional[float], typer.Option("--refine-worst", help="A budget: at most floor(F x n) of the n scored items go 'full' (the worst by the worse of their p and a percentiles; ties can take fewer), instead of the preset's fixed thresholds; without --scores the job scores everything first.")] = None,
    light_next: Annotated[Optional[float], typer.Option("--light-next", help="With --refine-worst: at most floor(G x n) more items go 'light', the next worst (default 0).")] = None,
    unit_rows: UnitRowsOpt = None,
    prompts: PromptsOpt = None,
    allow_paths: AllowPathsOpt = None,
    wait_lock: WaitLockOpt = 0.0,
) -> None:
    """Score every image of a data set, route it, refine the low-quality ones, write everything back.

    Routing thresholds are the preset's (fixed), or fractions of this data set with --refine-worst /
    --light-next; the thresholds used are in the manifest, the summary and the report.
    """
    if mode not in ("refine", "score"):
        _fail(f"--mode must be 'refine' or 'score', got {mode!r}", EXIT_USAGE)
    _job(dict(locals()))


@app.command()
def score(
    inputs: InputsArg,
    out: OutOpt,
    preset: PresetOpt = "sdxl",
    config: ConfigOpt = None,
    executor: ExecutorOpt = "ray",
    address: AddressOpt = None,
    workers: WorkersOpt = None,
    gpus_per_worker: GpusOpt = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per model batch.")] = 32,
    limit: LimitOpt = None,
    save_maps: MapsOpt = False,
    resume: ResumeOpt = True,
    force: ForceOpt = False,
    max_error_rate: ErrRateOpt = 0.1,
    quiet: QuietOpt = False,
    keep_images: KeepOpt = False,
    input_columns: InputColsOpt = True,
    image_column: ImgColOpt = None,
    prompt_column: PromptColOpt = None,
    id_column: IdColOpt = None,
    models_dir: ModelsDirOpt = None,
    random_weights: RandomOpt = False,
    unit_rows: UnitRowsOpt = None,
    prompts: PromptsOpt = None,
    allow_paths: AllowPathsOpt = None,
    wait_lock: WaitLockOpt = 0.0,
    refine_worst: Annotated[Optional[float], typer.Option("--refine-worst", help="Plan routes with a budget: at most this fraction F of the scored items full (the worst by the worse of their p and a percentiles), as `run --refine-worst` would; the audit is scored first into OUT/__grefine__/audit.")] = None,
    light_next: Annotated[Optional[float], typer.Option("--light-next", help="With --refine-worst: at most this fraction G light, the next worst (default 0).")] = None,
) -> None:
    """Score-only audit of a data set (same as `run --mode score`): ids, prompts, PQ/AQ scores and the route a
    run would take with the preset's thresholds (grefine_route, marked planned). Reuse it with `run --scores`."""
    _job({**locals(), "mode": "score", "image_format": "PNG"})


# --------------------------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------------------------- #


@models_app.command("list")
def models_list(models_dir: ModelsDirOpt = None) -> None:
    """Show every preset's models and whether their weights are present locally."""
    from grefine_curate.pipelines.models import list_models

    rows = list_models(models_dir=str(models_dir) if models_dir else None)
    table = [("preset", "component", "model", "present")] + [
        tuple(str(v) for v in (row.values() if isinstance(row, dict) else row)) for row in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


@models_app.command("pull")
def models_pull(
    preset: Annotated[str, typer.Argument(help="Preset whose weights to download (sdxl, sd15).")],
    to: Annotated[Path, typer.Option("--to", help="Folder to download into; pass it later as --models-dir.")],
) -> None:
    """Download everything a preset needs into a folder (needs internet)."""
    from grefine_curate.pipelines.models import pull_models

    fetched = pull_models(preset, str(to))
    for item in fetched:
        typer.echo(f"fetched {item}")
    typer.echo(f"done: use --models-dir {to}")


def main() -> None:
    """Console entry point: run the app and map domain errors to exit codes."""
    from grefine_curate.curate.errors import ConfigError, GRefineError, ImageError, InputError

    try:
        # Not click's standalone mode: it turns Ctrl-C into "Aborted!" with exit 1; we want 130.
        code = app(standalone_mode=False)
    except (ConfigError, InputError, ImageError) as e:  # bad usage, config or input file
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(EXIT_USAGE)
    except GRefineError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(EXIT_FAILURE)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        if type(e).__name__ == "Abort":  # click's wrapper of a KeyboardInterrupt
            typer.secho("interrupted", err=True)
            sys.exit(130)
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # click usage errors: message and exit 2
            e.show()
            sys.exit(e.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else EXIT_OK)

if __name__ == "__main__":
    main()
