"""`grefine-curate report OUT`: one self-contained HTML page about a curation job's output.

Written at the end of every `run`/`score` (and on demand) as ``OUT/__grefine__/report.html``. Everything is
inline, so the file can be mailed or opened offline: CSS in a <style> block, histograms as inline
SVG, images as base64 JPEG thumbnails; no script, font or image is fetched from anywhere.

Sections (each an element with a fixed id, which the browser test checks):

    #summary     what ran: OUT, mode, preset, state, rows, throughput
    #counts      rows per status and per route (skip / light / full / reverted), frequent errors
    #histograms  p (PQ-Map, paper eq. 3) and a (AQ-Map, eq. 8) before and after refinement, with the
                 routing thresholds of the run's resolved config drawn in
    #worst       the N worst items (lowest p, then lowest a): original, PQ-map overlay (red = low
                 perceptual quality, 1 - P), AQ-map overlay (red = needs refinement, A), refined image
    #phrases     the most frequent unmatched phrases (AQ-Map defects)
    #config      model ids, package versions and the resolved config, from OUT/__grefine__/manifest.json

Reading is two passes over the output shards: the scalar columns of every row first (cheap), then
maps and images only for the rows shown, row group by row group.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from grefine_curate.curate.errors import ImageError, InputError
from grefine_curate.curate.images import decode_image
from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.layout import report_path
from grefine_curate.pipelines.commit import write_atomic
from grefine_curate.pipelines.formats import get_format
from grefine_curate.pipelines.formats.base import OutputView, take_rows
from grefine_curate.pipelines.formats.parquet import PROMPT_COLUMN_CANDIDATES
from grefine_curate.pipelines.job_view import open_job, outputs_of
from grefine_curate.pipelines.paths import join, resolve_fs

THUMB = 176  # long side of the thumbnails, pixels
HIST_BINS = 20
N_PHRASES = 30
N_ERRORS = 8
OVERLAY_RGB = np.array([228.0, 26.0, 28.0], dtype=np.float32)  # red
OVERLAY_ALPHA = 0.7  # opacity where the map is 1
SCALARS = (C.STATUS, C.ERROR, C.ROUTE, C.PQ_SCORE, C.AQ_SCORE, C.PQ_SCORE_AFTER, C.AQ_SCORE_AFTER, C.UNMATCHED,
           C.ID, C.SOURCE, C.PROMPT)


@dataclass
class Row:
    shard: str  # output shard, relative to OUT
    index: int  # row index within the shard (= within its input shard: outputs keep input order)
    status: str
    error: str | None
    route: str | None
    p: float | None
    a: float | None
    p_after: float | None
    a_after: float | None
    unmatched: list[str]
    item_id: str
    source: str | None  # folder input: image path relative to the input folder
    prompt: str | None
    view: OutputView | None = None  # its output shard, as its format reads it back


@dataclass
class ShardInfo:
    rel: str  # relative to OUT
    path: str  # absolute (fs) path of the output
    input: str | None  # input shard path from the manifest (Parquet file or folder root)
    names: list[str] = field(default_factory=list)  # output columns
    view: OutputView | None = None  # the output as its format reads it back


# ---------------------------------------------------------------------------------------------
# Reading


def _floats(col: list) -> list[float | None]:
    return [None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v) for v in col]


def _list_output_shards(fs: pafs.FileSystem, root: str, manifest: dict[str, Any]) -> list[ShardInfo]:
    """The job's complete output shards (job_view.py: each with its format, from the manifest)."""
    return [ShardInfo(rel=v.rel, path=v.path, input=v.input, view=v) for v in outputs_of(fs, root, manifest)[0]]


def _read_rows(fs: pafs.FileSystem, shard: ShardInfo) -> list[Row]:
    with fs.open_input_file(shard.path) as f:
        pf = pq.ParquetFile(f)
        shard.names = list(pf.schema_arrow.names)
        if C.STATUS not in shard.names:
            return []  # not an output of the job (no status column)
        prompt_col = C.PROMPT if C.PROMPT in shard.names else next(
            (c for c in PROMPT_COLUMN_CANDIDATES if c in shard.names), None)
        wanted = [c for c in SCALARS + (C.KEY,) if c in shard.names] + ([prompt_col] if prompt_col and prompt_col != C.PROMPT else [])
        table = pf.read(columns=wanted).to_pydict()
    n = len(table[C.STATUS])
    get = lambda name: table.get(name, [None] * n)  # noqa: E731
    ps, as_, pa_, aa = (_floats(get(c)) for c in (C.PQ_SCORE, C.AQ_SCORE, C.PQ_SCORE_AFTER, C.AQ_SCORE_AFTER))
    ids, prompts = get(C.ID if C.ID in table else C.KEY), get(prompt_col) if prompt_col else [None] * n
    return [
        Row(shard=shard.rel, index=i, status=get(C.STATUS)[i] or C.STATUS_ERROR, error=get(C.ERROR)[i],
            route=get(C.ROUTE)[i], p=ps[i], a=as_[i], p_after=pa_[i], a_after=aa[i],
            unmatched=list(get(C.UNMATCHED)[i] or []), item_id=str(ids[i]) if ids[i] is not None else f"{shard.rel}#{i}",
            source=get(C.SOURCE)[i], prompt=prompts[i], view=shard.view)
        for i in range(n)
    ]


def _take(fs: pafs.FileSystem, path: str, column: str, rows: list[int]) -> dict[int, Any]:
    return take_rows(fs, path, column, rows)


# ---------------------------------------------------------------------------------------------
# Pictures


def _decode(data: bytes | None) -> Image.Image | None:
    if not data:
        return None
    try:
        img = decode_image(data, name="report", draft_size=(THUMB, THUMB))
    except ImageError:
        return None
    img.thumbnail((THUMB, THUMB), Image.BICUBIC)
    return img


def _data_uri(img: Image.Image, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, "JPEG", quality=82)
    else:
        img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _overlay(base: Image.Image | None, map_png: bytes, invert: bool) -> Image.Image | None:
    """The map as red over the image (grey when the original is not available); invert: show 1 - map."""
    try:
        m = Image.open(io.BytesIO(map_png)).convert("L")
    except Exception:  # noqa: BLE001 - a broken map cell shows as missing, not a failed report
        return None
    size = base.size if base is not None else (THUMB, THUMB)
    heat = np.asarray(m.resize(size, Image.BILINEAR), dtype=np.float32) / 255.0  # (H, W)
    if invert:
        heat = 1.0 - heat
    rgb = np.asarray(base.convert("RGB"), dtype=np.float32) if base is not None else np.full((*size[::-1], 3), 128.0, np.float32)
    alpha = OVERLAY_ALPHA * heat[..., None]
    out = rgb * (1.0 - alpha) + OVERLAY_RGB * alpha
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------
# HTML pieces


# C0 and C1 controls, DEL, and the bidi embeddings/overrides/isolates (U+202A-U+202E, U+2066-U+2069): a
# NUL, an ESC or a right-to-left override in a prompt, id, file name or error must not reach the page raw.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _visible(ch: str) -> str:
    """A control character as a visible stand-in: its Unicode control picture (C0, DEL), else U+FFFD."""
    code = ord(ch)
    if code < 0x20:
        return chr(0x2400 + code)  # NUL -> U+2400, ESC -> U+241B, ...
    return "\u2421" if code == 0x7F else "\ufffd"


def _clean(text: str, keep_newlines: bool = False) -> str:
    """The text with every control and bidi-override character replaced by a visible stand-in."""
    if keep_newlines:
        return "\n".join(_CONTROL.sub(lambda m: _visible(m.group()), line) for line in text.split("\n"))
    return _CONTROL.sub(lambda m: _visible(m.group()), text)


def _e(v: Any, keep_newlines: bool = False) -> str:
    """Text for the page: control characters made visible, then HTML-escaped."""
    return html.escape(_clean("" if v is None else str(v), keep_newlines), quote=True)


def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _histogram_svg(title: str, before: list[float], after: list[float] | None,
                   thresholds: list[tuple[str, float]], svg_id: str) -> str:
    """Inline SVG: bars for before, a step line for after, dashed vertical threshold lines."""
    w, h, ml, mr, mt, mb = 460, 200, 40, 12, 26, 34
    pw, ph = w - ml - mr, h - mt - mb
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    hb = np.histogram(np.clip(before, 0, 1), bins=edges)[0] if before else np.zeros(HIST_BINS, int)
    ha = np.histogram(np.clip(after, 0, 1), bins=edges)[0] if after else None
    top = max(1, int(hb.max()), int(ha.max()) if ha is not None else 0)
    x = lambda v: ml + pw * float(v)  # noqa: E731
    y = lambda c: mt + ph * (1.0 - c / top)  # noqa: E731
    bw = pw / HIST_BINS
    parts = [f'<svg id="{_e(svg_id)}" class="hist" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
             f'role="img" aria-label="{_e(title)}">',
             f'<text x="{ml}" y="16" class="t">{_e(title)}</text>',
             f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}" class="ax"/>',
             f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{mt + ph}" class="ax"/>',
             f'<text x="{ml - 4}" y="{mt + 4}" class="yl">{top}</text>',
             f'<text x="{ml - 4}" y="{mt + ph}" class="yl">0</text>']
    for i, c in enumerate(hb):
        if c:
            parts.append(f'<rect class="before" x="{ml + i * bw + 1:.1f}" y="{y(c):.1f}" width="{bw - 2:.1f}" '
                         f'height="{mt + ph - y(c):.1f}" data-count="{int(c)}"><title>{edges[i]:.2f}-{edges[i + 1]:.2f}: {int(c)}</title></rect>')
    if ha is not None:
        pts = []
        for i, c in enumerate(ha):
            pts += [f"{ml + i * bw:.1f},{y(c):.1f}", f"{ml + (i + 1) * bw:.1f},{y(c):.1f}"]
        parts.append(f'<polyline class="after" points="{" ".join(pts)}"/>')
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{x(t):.1f}" y="{mt + ph + 14}" class="xl">{t:g}</text>')
    for (name, v), (tx, anchor, row) in zip(thresholds, _label_layout(thresholds, ml, pw)):
        parts.append(f'<line class="thr" x1="{x(v):.1f}" y1="{mt}" x2="{x(v):.1f}" y2="{mt + ph}" data-threshold="{_e(name)}"/>'
                     f'<text class="thl" x="{tx:.1f}" y="{mt + 10 + LABEL_ROW * row}" text-anchor="{anchor}">'
                     f'{_e(name)} {v:g}</text>')
    legend_y = h - 4
    parts.append(f'<rect x="{ml}" y="{legend_y - 9}" width="10" height="10" class="before"/>'
                 f'<text x="{ml + 14}" y="{legend_y}" class="lg">before (n={len(before)})</text>')
    if ha is not None:
        parts.append(f'<line x1="{ml + 150}" y1="{legend_y - 4}" x2="{ml + 164}" y2="{legend_y - 4}" class="after"/>'
                     f'<text x="{ml + 168}" y="{legend_y}" class="lg">after (n={len(after)})</text>')
    parts.append("</svg>")
    return "".join(parts)


LABEL_CHAR_W = 6.2  # px per character of a 10px threshold label (an upper estimate for system-ui)
LABEL_ROW = 13  # px between label rows


def _label_layout(thresholds: list[tuple[str, float]], ml: float, pw: float) -> list[tuple[float, str, int]]:
    """(x, text-anchor, row) per threshold label: beside its own line, inside the plot, clear of the other
    labels and of the other thresholds' lines where the plot allows it (two labels never share a box)."""
    xs = [ml + pw * min(max(float(v), 0.0), 1.0) for _, v in thresholds]
    widths = [LABEL_CHAR_W * len(f"{name} {v:g}") for name, v in thresholds]
    placed: list[tuple[float, float, int]] = []  # (left, right, row)
    out: list[tuple[float, str, int] | None] = [None] * len(thresholds)
    for i in sorted(range(len(thresholds)), key=lambda k: xs[k]):
        options = []
        for anchor in ("start", "end"):
            left = xs[i] + 3 if anchor == "start" else xs[i] - 3 - widths[i]
            right = left + widths[i]
            if left < ml or right > ml + pw:
                continue
            crossed = sum(1 for k, xk in enumerate(xs) if k != i and left - 1 <= xk <= right + 1)
            options.append((crossed, anchor != "start", left, right, anchor))
        if not options:  # wider than the room on either side: the side with more room
            anchor = "start" if (ml + pw - xs[i]) >= (xs[i] - ml) else "end"
            left = xs[i] + 3 if anchor == "start" else xs[i] - 3 - widths[i]
            options = [(0, False, left, left + widths[i], anchor)]
        crossed, _, left, right, anchor = min(options)
        row = 0
        while any(r == row and left < pr + 2 and pl - 2 < right for pl, pr, r in placed):
            row += 1
        placed.append((left, right, row))
        out[i] = (xs[i] + 3 if anchor == "start" else xs[i] - 3, anchor, row)
    return out  # type: ignore[return-value]


def _img_cell(img: Image.Image | None, role: str, missing: str) -> str:
    if img is None:
        return f'<td class="cell missing" data-role="{role}"><div class="ph">{_e(missing)}</div></td>'
    return (f'<td class="cell" data-role="{role}"><img class="thumb" alt="{role}" src="{_data_uri(img)}" '
            f'width="{img.width}" height="{img.height}"></td>')


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d232b;background:#f6f7f9}
header{background:#1d2b3a;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;opacity:.8}main{padding:8px 24px 40px;max-width:1200px}
section{background:#fff;border:1px solid #dfe3e8;border-radius:8px;padding:12px 18px;margin:14px 0}
h2{font-size:16px;margin:4px 0 10px}table{border-collapse:collapse}
td,th{padding:3px 10px;border-bottom:1px solid #edf0f3;text-align:left;vertical-align:top}
th{font-weight:600;color:#4a5663}.num{text-align:right;font-variant-numeric:tabular-nums}
.kv td:first-child{color:#4a5663}.hists{display:flex;flex-wrap:wrap;gap:16px}
svg.hist .t{font-size:13px;font-weight:600}svg.hist .xl{font-size:10px;text-anchor:middle;fill:#4a5663}
svg.hist .yl{font-size:10px;text-anchor:end;fill:#4a5663}svg.hist .lg{font-size:11px;fill:#4a5663}
svg.hist .ax{stroke:#9aa5b1}svg.hist rect.before{fill:#6f9fd8}
svg.hist .after{fill:none;stroke:#e8710a;stroke-width:2}svg.hist .thr{stroke:#b3261e;stroke-dasharray:4 3}
svg.hist .thl{font-size:10px;fill:#b3261e}
table.worst td.cell{padding:4px}table.worst img.thumb{display:block;border-radius:4px}
table.worst .ph{width:160px;height:96px;display:flex;align-items:center;justify-content:center;text-align:center;
background:#f0f2f5;color:#6b7785;font-size:12px;border-radius:4px;padding:4px}
table.worst td.meta{font-size:12px;max-width:260px;word-break:break-word}
.badge{display:inline-block;padding:0 6px;border-radius:9px;background:#e6ecf3;font-size:11px}
.bar{display:inline-block;height:10px;background:#6f9fd8;border-radius:2px;vertical-align:middle}
.banner{background:#b3261e;color:#fff;padding:10px 24px;font-weight:600}
form.filter{display:flex;flex-wrap:wrap;gap:10px;align-items:center}form.filter input[type=number]{width:70px}
.tabs>input{display:none}.tabs>label{display:inline-block;padding:4px 12px;margin:0 4px 8px 0;border-radius:12px;background:#e6ecf3;cursor:pointer}.route-page{display:none}
#tab-skip:checked+label{background:#1d2b3a;color:#fff}#tab-skip:checked~#route-skip{display:block}
#tab-light:checked+label{background:#1d2b3a;color:#fff}#tab-light:checked~#route-light{display:block}
#tab-full:checked+label{background:#1d2b3a;color:#fff}#tab-full:checked~#route-full{display:block}
#tab-reverted:checked+label{background:#1d2b3a;color:#fff}#tab-reverted:checked~#route-reverted{display:block}
table.items td{font-size:12px}.loc{word-break:break-all}table.items td.err{color:#b3261e}
.note{color:#6b7785;font-size:12px}pre{background:#f6f7f9;padding:8px;overflow:auto;max-height:480px;font-size:12px}
"""


# ---------------------------------------------------------------------------------------------
# The report


def write_report(out_dir: str | Path, n_worst: int = 24, n_best: int = 12, n_route: int = 12,
                 n_table: int = 2000) -> Path:
    """Write ``OUT/__grefine__/report.html`` for the job output in ``out_dir`` and return its path.

    Raises InputError when ``out_dir`` holds no job manifest (``__grefine__/manifest.json``).
    """
    # 1. Check inputs
    for name, v in (("n_worst", n_worst), ("n_best", n_best), ("n_route", n_route), ("n_table", n_table)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    job = open_job(str(out_dir))
    fs, root, manifest = job.fs, job.root, job.manifest
    # 2. Read the scalar columns of every output row
    shards = _list_output_shards(fs, root, manifest)
    rows: list[Row] = []
    for shard in shards:
        rows.extend(_read_rows(fs, shard))
    # 3. Build the page
    cfg = (manifest.get("result_config") or {}).get("preset") or {}
    mode = (manifest.get("result_config") or {}).get("mode") or manifest.get("mode") or "refine"
    body = [
        _summary(manifest, root, rows, shards, mode),
        _counts(rows, mode),
        _histograms(rows, cfg.get("routing") or {}, mode),
        _filter(mode),
        _worst(fs, root, rows, shards, manifest, mode, n_worst),
        _best(fs, root, rows, shards, manifest, mode, n_best),
        _route_pages(fs, root, rows, shards, manifest, mode, n_route),
        _phrases(rows),
        _all_items(rows, mode, manifest, n_table),
        _config(manifest),
    ]
    title = f"grefine-curate report: {posixpath.basename(root.rstrip('/')) or root}"
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head><body>'
            f'<header><h1>{_e(title)}</h1><p>G-Refine curation: PQ-Map (perceptual quality p), AQ-Map (alignment a), '
            f'routing and refinement</p></header>{_banner(manifest)}<main>{"".join(body)}</main></body></html>')
    # 4. Write it atomically
    path = report_path(root)
    write_atomic(fs, path, page.encode("utf-8"))
    return Path(path)


def _summary(manifest: dict, root: str, rows: list[Row], shards: list[ShardInfo], mode: str) -> str:
    run = manifest.get("run") or {}
    items = [
        ("output", root),
        ("mode", mode),
        ("preset", manifest.get("preset")),
        ("state", f"{manifest.get('state', '-')} (exit code {manifest.get('exit_code', '-')})"),
        ("rows", f"{len(rows)} in {len(shards)} output shard(s)"),
        ("throughput", f"{run.get('items_per_s', '-')} img/s over {run.get('wall_s', '-')} s "
                       f"({run.get('executor', '-')}, {_workers_ran(run)})" if run else "-"),
        ("routing thresholds", _thresholds_line(manifest)),
        ("config hash", manifest.get("config_hash")),
        ("updated", manifest.get("updated_at")),
    ]
    trs = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v if v not in (None, '') else '-')}</td></tr>" for k, v in items)
    return f'<section id="summary"><h2>Summary</h2><table class="kv">{trs}</table></section>'


def _workers_ran(run: dict) -> str:
    """How many workers processed units in the last run (manifest run.workers, at most one per unit run)."""
    workers, units, rows = run.get("workers"), run.get("units_run"), run.get("rows")
    if units == 0 or (units is None and rows == 0):
        return "no worker ran: nothing was left to do"
    if not isinstance(workers, int):
        return "workers not recorded"
    n = min(workers, units) if isinstance(units, int) else workers
    return f"{n} worker{'s' if n != 1 else ''} ran"


def _thresholds_line(manifest: dict) -> str:
    """The thresholds in force and where they came from (manifest "routing", else the resolved preset)."""
    info = manifest.get("routing") or {}
    t = info.get("thresholds") or (((manifest.get("result_config") or {}).get("preset") or {}).get("routing") or {})
    if not t:
        return "-"
    nums = ", ".join(f"{k} {float(t[k]):.4f}" for k in ("light_p", "light_a", "skip_p", "skip_a") if k in t)
    if info.get("source") == "quantiles":
        how = (f"from this data set's scores, a budget: at most {float(info['refine_worst']):.1%} full and "
               f"{float(info['light_next']):.1%} light, worst first by the worse of each item's p and a percentiles")
        r = info.get("realised")
        if r:  # what the budget gave (ties can take fewer)
            how += (f"; realised {r['full']} full ({float(r['full_fraction']):.1%}), {r['light']} light "
                    f"({float(r['light_fraction']):.1%}), {r['skip']} skip")
    else:
        how = "the preset's fixed values"
    src = f"; scores reused from {info['scores_from']}" if info.get("scores_from") else ""
    planned = " (planned: a score run refines nothing)" if info.get("planned") else ""
    return f"{nums} ({how}{src}){planned}"


def _counts(rows: list[Row], mode: str) -> str:
    status = Counter(r.status for r in rows)
    routes = Counter(r.route for r in rows if r.status == C.STATUS_OK and r.route)
    n = max(1, len(rows))
    st = "".join(
        f'<tr><td>{_e(k)}</td><td class="num" data-count="status:{_e(k)}">{status.get(k, 0)}</td>'
        f'<td class="num">{status.get(k, 0) / n:.1%}</td></tr>'
        for k in (C.STATUS_OK, C.STATUS_ERROR))
    parts = [f'<section id="counts"><h2>Counts</h2><div class="hists"><table id="status-counts">'
             f'<tr><th>status</th><th>rows</th><th></th></tr>{st}</table>']
    if mode == "refine":
        meaning = {"skip": "kept as is", "light": "stage 2 only", "full": "stage 1 + stage 2",
                   "reverted": "refined, then the guard kept the original"}
        rt = "".join(
            f'<tr><td>{_e(k)}</td><td class="num" data-count="route:{_e(k)}">{routes.get(k, 0)}</td>'
            f'<td class="note">{meaning[k]}</td></tr>' for k in C.ROUTES)
        parts.append(f'<table id="route-counts"><tr><th>route</th><th>rows</th><th></th></tr>{rt}</table>')
    elif routes:  # score mode: the routes a `run` would take with the thresholds in force (nothing refined)
        meaning = {"skip": "would be kept as is", "light": "would get stage 2 only",
                   "full": "would get stage 1 + stage 2"}
        rt = "".join(
            f'<tr><td>{_e(k)}</td><td class="num" data-count="planned:{_e(k)}">{routes.get(k, 0)}</td>'
            f'<td class="note">{meaning[k]}</td></tr>' for k in ("skip", "light", "full"))
        parts.append(f'<table id="route-counts"><tr><th>planned route</th><th>rows</th><th></th></tr>{rt}</table>')
    else:
        parts.append('<p class="note" id="route-counts">score mode: no routing or refinement.</p>')
    parts.append("</div>")
    errors = Counter(_error_kind(r.error) for r in rows if r.status != C.STATUS_OK)
    if errors:
        trs = "".join(f'<tr><td class="num">{c}</td><td>{_e(msg)}</td></tr>' for msg, c in errors.most_common(N_ERRORS))
        parts.append(f'<h2>Most frequent errors</h2><table id="errors">{trs}</table>')
    parts.append("</section>")
    return "".join(parts)


def _error_kind(message: str | None) -> str:
    """An error message without its item-specific prefix ("x.parquet#3: cannot decode ..." -> "cannot decode ...")."""
    if not message:
        return "unknown error"
    head, sep, tail = message.partition(": ")
    text = tail if sep and (" " not in head or "#" in head or "/" in head) else message
    return text if len(text) <= 160 else text[:157] + "..."


def _histograms(rows: list[Row], routing: dict, mode: str) -> str:
    ok = [r for r in rows if r.status == C.STATUS_OK]
    refine = mode == "refine"

    def final(before: float | None, after: float | None) -> float | None:
        return after if after is not None else before  # not refined: the item keeps its score

    p_before = [r.p for r in ok if r.p is not None]
    a_before = [r.a for r in ok if r.a is not None]
    p_after = [v for v in (final(r.p, r.p_after) for r in ok) if v is not None] if refine else None
    a_after = [v for v in (final(r.a, r.a_after) for r in ok) if v is not None] if refine else None
    thr_p = [(k, float(routing[k])) for k in ("skip_p", "light_p") if k in routing]
    thr_a = [(k, float(routing[k])) for k in ("skip_a", "light_a") if k in routing]
    svgs = [_histogram_svg("PQ-Map p (perceptual quality)", p_before, p_after, thr_p, "hist-p")]
    if a_before:
        svgs.append(_histogram_svg("AQ-Map a (alignment quality)", a_before, a_after, thr_a, "hist-a"))
    else:
        svgs.append('<p class="note" id="hist-a">no AQ scores (no prompts in the input).</p>')
    note = ("bars: scores before refinement; line: scores of the final images (refined items re-scored, others "
            "unchanged); dashed: routing thresholds (skip when p &ge; skip_p and a &ge; skip_a; full when "
            "p &lt; light_p or a &lt; light_a; light otherwise)." if refine else
            "scores of the input images; dashed: the routing thresholds a `run` would use.")
    return (f'<section id="histograms"><h2>Score distributions</h2><div class="hists">{"".join(svgs)}</div>'
            f'<p class="note">{note}</p>{_quantile_table(p_before, a_before)}</section>')


def _ranked(rows: list[Row]) -> list[Row]:
    """Scored rows, worst first: lowest p, then lowest a."""
    ok = [r for r in rows if r.status == C.STATUS_OK and r.p is not None]
    ok.sort(key=lambda r: (r.p, r.a if r.a is not None else math.inf))
    return ok


QUANTILES = (0.05, 0.10, 0.15, 0.20, 0.30, 0.50)


def _quantile_table(p: list[float], a: list[float]) -> str:
    """The thresholds `run --refine-worst F` would choose, for a few F (scores before refinement)."""
    if not p:
        return ""
    from grefine_curate.pipelines.thresholds import threshold_at

    pv, av = np.asarray(p), np.asarray(a)
    head = "".join(f"<th>{f:.0%}</th>" for f in QUANTILES)
    rows = [f'<tr><td>p</td>{"".join(f"<td class=num>{threshold_at(pv, f):.4f}</td>" for f in QUANTILES)}</tr>']
    if len(av):
        rows.append(f'<tr><td>a</td>{"".join(f"<td class=num>{threshold_at(av, f):.4f}</td>" for f in QUANTILES)}</tr>')
    return (f'<table id="quantiles"><tr><th>worst fraction F</th>{head}</tr>{"".join(rows)}</table>'
            '<p class="note">the scores below which the worst fraction F of the items lie: the light_p / light_a '
            "thresholds that <code>run --refine-worst F</code> would choose (and skip_p / skip_a for F + G).</p>")


def _worst(fs: pafs.FileSystem, root: str, rows: list[Row], shards: list[ShardInfo], manifest: dict, mode: str,
           n_worst: int) -> str:
    chosen = _ranked(rows)[:n_worst]
    has_maps = any(C.PQ_MAP in s.names for s in shards)
    head = (f'<section id="worst"><h2>The {len(chosen)} worst items</h2><p class="note">Lowest p first, then lowest a. '
            "PQ overlay: red where perceptual quality is low (1 - P). AQ overlay: red where the image needs "
            "refinement for its prompt (A).</p>")
    if not has_maps:
        head += '<p class="note" id="maps-note">No maps in this output: run with --save-maps to see maps.</p>'
    if not chosen:
        return head + '<p class="note">no scored items.</p></section>'
    return head + _gallery(fs, root, chosen, shards, manifest, mode) + "</section>"


def _best(fs: pafs.FileSystem, root: str, rows: list[Row], shards: list[ShardInfo], manifest: dict, mode: str,
          n_best: int) -> str:
    chosen = _ranked(rows)[::-1][:n_best] if n_best else []
    head = (f'<section id="best"><h2>The {len(chosen)} best items</h2><p class="note">Highest p first, then highest a: '
            "what the data set's good end looks like.</p>")
    if not chosen:
        return head + '<p class="note">no scored items.</p></section>'
    return head + _gallery(fs, root, chosen, shards, manifest, mode) + "</section>"


def _route_pages(fs: pafs.FileSystem, root: str, rows: list[Row], shards: list[ShardInfo], manifest: dict, mode: str,
                 n_route: int) -> str:
    """One tab per route (pure CSS: radio buttons), each with its worst items."""
    ranked = _ranked(rows)
    names = list(C.ROUTES) if mode == "refine" else ["skip", "light", "full"]
    word = "route" if mode == "refine" else "planned route"
    tabs, pages = [], []
    for k, name in enumerate(names):
        members = [r for r in ranked if r.route == name]
        chosen = members[:n_route]
        tabs.append(f'<input type="radio" name="route-tab" id="tab-{name}"{" checked" if k == 0 else ""}>'
                    f'<label for="tab-{name}">{_e(name)} ({len(members)})</label>')
        body = (_gallery(fs, root, chosen, shards, manifest, mode) if chosen else
                f'<p class="note">no item has {word} {_e(name)}.</p>')
        pages.append(f'<div class="route-page" id="route-{name}" data-route-page="{_e(name)}"><p class="note">'
                     f"{word} {_e(name)}: {len(members)} items; the {len(chosen)} worst shown.</p>{body}</div>")
    return (f'<section id="routes"><h2>Items per {word}</h2><div class="tabs">{"".join(tabs)}'
            f'{"".join(pages)}</div></section>')


def _location(r: Row, mode: str, manifest: dict) -> str:
    """Where the item's final image is, relative to OUT (so a curator can find it): its format says."""
    if r.view is None:
        return f"{r.shard} row {r.index}"
    return get_format(r.view.format).location(r.view, r.index, r.item_id, r.source)


def _gallery(fs: pafs.FileSystem, root: str, chosen: list[Row], shards: list[ShardInfo], manifest: dict,
             mode: str) -> str:
    """Item rows with original, PQ overlay, AQ overlay and refined image; pictures read for these rows only."""
    by_rel = {s.rel: s for s in shards}
    has_maps = any(C.PQ_MAP in s.names for s in shards)
    pics: dict[tuple[str, int], dict[str, Any]] = {(r.shard, r.index): {} for r in chosen}
    for rel in sorted({r.shard for r in chosen}):
        shard = by_rel[rel]
        idx = [r.index for r in chosen if r.shard == rel]
        for col in (C.PQ_MAP, C.AQ_MAP):
            if col in shard.names:
                for i, v in _take(fs, shard.path, col, idx).items():
                    pics[(rel, i)][col] = v
        originals, refined = _shard_images(fs, root, shard, chosen, manifest, mode, idx)
        for i in idx:
            pics[(rel, i)]["original"] = originals.get(i)
            pics[(rel, i)]["refined"] = refined.get(i)
    trs = ['<tr><th>item</th><th>original</th><th>PQ map</th><th>AQ map</th><th>refined</th></tr>']
    for r in chosen:
        got = pics[(r.shard, r.index)]
        base = _decode(got.get("original"))
        pq_png, aq_png = got.get(C.PQ_MAP), got.get(C.AQ_MAP)
        pq_img = _overlay(base, pq_png, invert=True) if pq_png else None
        aq_img = _overlay(base, aq_png, invert=False) if aq_png else None
        no_map = "run with --save-maps to see maps"
        aq_missing = no_map if not has_maps else ("no prompt: no AQ map" if r.a is None else "no map")
        ref_img, ref_missing = _refined_cell(r, got.get("refined"), mode)
        meta = (f'<td class="meta"><b>{_e(r.item_id)}</b><br>p {_f(r.p)}'
                + (f" &rarr; {_f(r.p_after)}" if r.p_after is not None and mode == "refine" else "")
                + f" &nbsp; a {_f(r.a)}" + (f" &rarr; {_f(r.a_after)}" if r.a_after is not None and mode == "refine" else "")
                + (f'<br><span class="badge">{_e(r.route)}</span>' if r.route else "")
                + (f"<br>{_e(r.prompt)}" if r.prompt else "")
                + (f'<br><span class="note">unmatched: {_e(", ".join(r.unmatched))}</span>' if r.unmatched else "")
                + f'<br><span class="note loc">in OUT: {_e(_location(r, mode, manifest))}</span>'
                + "</td>")
        trs.append(
            f'<tr class="item" {_filter_attrs(r)}>{meta}'
            + _img_cell(base, "original", "original not available")
            + _img_cell(pq_img, "pq", no_map if not has_maps else "no map")
            + _img_cell(aq_img, "aq", aq_missing)
            + _img_cell(ref_img, "refined", ref_missing) + "</tr>")
    return f'<table class="worst">{"".join(trs)}</table>'


def _filter_attrs(r: Row) -> str:
    """What the filter script reads from an item row."""
    return (f'data-key="{_e(r.shard)}#{r.index}" data-item="{_e(r.item_id)}" data-p="{"" if r.p is None else r.p}" data-a="{"" if r.a is None else r.a}" '
            f'data-route="{_e(r.route or "")}" data-phrases="{_e(json.dumps([_clean(ph) for ph in r.unmatched]))}" '
            f'data-text="{_e(((r.prompt or "") + " " + " ".join(r.unmatched)).lower())}"')


def _all_items(rows: list[Row], mode: str, manifest: dict, n_table: int) -> str:
    """A text-only table of items (worst first, up to n_table; then the error rows with their input file)
    that the filter also searches."""
    ranked = _ranked(rows)
    shown = ranked[:n_table]
    trs = ['<tr><th>item</th><th>p</th><th>a</th>' + ('<th>p after</th><th>a after</th>' if mode == "refine" else "")
           + '<th>route</th><th>unmatched phrases</th><th>in OUT</th></tr>']
    for r in shown:
        trs.append(f'<tr class="item" {_filter_attrs(r)}><td>{_e(r.item_id)}</td><td class="num">{_f(r.p)}</td>'
                   f'<td class="num">{_f(r.a)}</td>'
                   + (f'<td class="num">{_f(r.p_after)}</td><td class="num">{_f(r.a_after)}</td>' if mode == "refine" else "")
                   + f'<td>{_e(r.route or "-")}</td><td>{_e(", ".join(r.unmatched))}</td>'
                   f'<td class="note">{_e(_location(r, mode, manifest))}</td></tr>')
    # Error rows after the scored ones: no scores, the error in place of the phrases, and the input file
    errors = [r for r in rows if r.status != C.STATUS_OK][:n_table]
    n_errors = sum(1 for r in rows if r.status != C.STATUS_OK)
    blank = '<td class="num">-</td>' * (4 if mode == "refine" else 2)
    for r in errors:
        trs.append(f'<tr class="item error" {_filter_attrs(r)}><td>{_e(r.item_id)}</td>{blank}'
                   f'<td class="err">error</td><td class="err">{_e(_error_text(r.error))}</td>'
                   f'<td class="note">input: {_e(_input_file(r, manifest))}; row: {_e(_location(r, mode, manifest))}</td></tr>')
    note = (f"all {len(ranked)} scored items" if len(shown) == len(ranked) else
            f"the {len(shown)} worst of {len(ranked)} scored items (report --table-rows N for more)")
    if n_errors:
        note += (f", then the error row{'s' if n_errors != 1 else ''} ({n_errors})" if len(errors) == n_errors else
                 f", then {len(errors)} of the {n_errors} error rows")
    return (f'<section id="items"><h2>Items</h2><p class="note">{note}, worst first; the filter above applies.</p>'
            f'<table class="items">{"".join(trs)}</table></section>')


def _error_text(message: str | None) -> str:
    text = message or "unknown error"
    return text if len(text) <= 300 else text[:297] + "..."


def _input_file(r: Row, manifest: dict) -> str:
    """The input an item came from: its file in an input folder, else its row in the input shard."""
    entry = next((e for e in manifest.get("inputs") or [] if e.get("shard") == r.shard), {})
    where = entry.get("input")
    if r.source:
        return join(where, r.source) if where else r.source
    return f"{where} row {r.index}" if where else f"{r.shard} row {r.index} (input not recorded)"


FILTER_HTML = """<section id="filter"><h2>Filter</h2><form class="filter" onsubmit="return false">
<label>phrase or prompt text <input id="f-text" type="search" placeholder="e.g. red sofa"></label>
<label>p from <input id="f-pmin" type="number" step="0.01" min="0" max="1"></label>
<label>to <input id="f-pmax" type="number" step="0.01" min="0" max="1"></label>
<label>a from <input id="f-amin" type="number" step="0.01" min="0" max="1"></label>
<label>to <input id="f-amax" type="number" step="0.01" min="0" max="1"></label>
<label>route <select id="f-route"><option value="">any</option>%s</select></label>
<span class="note" id="f-count"></span></form>
<p class="note">Applies to every item shown on this page (galleries, route pages and the item table).
An item without a prompt has no a: a range on a hides it.</p></section>
<script>
(function () {
  const ids = ["f-text", "f-pmin", "f-pmax", "f-amin", "f-amax", "f-route"];
  const num = id => { const v = document.getElementById(id).value; return v === "" ? null : Number(v); };
  function apply() {
    const text = document.getElementById("f-text").value.trim().toLowerCase();
    const route = document.getElementById("f-route").value;
    const pmin = num("f-pmin"), pmax = num("f-pmax"), amin = num("f-amin"), amax = num("f-amax");
    const all = new Set(), shown = new Set();  // an item has a row in several tables: count it once
    document.querySelectorAll("tr.item").forEach(tr => {
      const d = tr.dataset, p = d.p === "" ? null : Number(d.p), a = d.a === "" ? null : Number(d.a);
      let ok = (!text || d.text.includes(text)) && (!route || d.route === route);
      if (pmin !== null) ok = ok && p !== null && p >= pmin;
      if (pmax !== null) ok = ok && p !== null && p <= pmax;
      if (amin !== null) ok = ok && a !== null && a >= amin;
      if (amax !== null) ok = ok && a !== null && a <= amax;
      tr.style.display = ok ? "" : "none";
      all.add(d.key); if (ok) shown.add(d.key);
    });
    document.getElementById("f-count").textContent = shown.size + " of " + all.size + " items shown";
  }
  ids.forEach(id => document.getElementById(id).addEventListener("input", apply));
  document.addEventListener("DOMContentLoaded", apply);  // the item tables come after this script
})();
</script>"""


def _filter(mode: str) -> str:
    names = C.ROUTES if mode == "refine" else ("skip", "light", "full")
    return FILTER_HTML % "".join(f'<option value="{n}">{n}</option>' for n in names)


def _banner(manifest: dict) -> str:
    """A warning when the scores come from random weights (the tiny preset, or refiner.random_weights)."""
    models = manifest.get("models") or {}
    preset = (manifest.get("result_config") or {}).get("preset") or {}
    clip_random = str(models.get("clip", "")).endswith("/random")
    refiner_random = bool((preset.get("refiner") or {}).get("random_weights")) or preset.get("name") == "tiny"
    if not (clip_random or refiner_random):
        return ""
    what = "scores, maps and routes" if clip_random else "refined images"
    return (f'<div class="banner" id="random-weights">Random weights: the {what} of this run come from models with '
            f"random weights (preset {_e(manifest.get('preset'))}); they carry no quality meaning.</div>")


def _refined_cell(r: Row, data: bytes | None, mode: str) -> tuple[Image.Image | None, str]:
    if mode != "refine":
        return None, "score mode: not refined"
    if r.route in ("skip", "reverted"):
        return None, {"skip": "route skip: kept as is", "reverted": "reverted: the guard kept the original"}[r.route]
    img = _decode(data)
    return img, "refined image not available"


def _shard_images(fs: pafs.FileSystem, root: str, shard: ShardInfo, chosen: list[Row], manifest: dict, mode: str,
                  idx: list[int]) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """(original bytes, refined bytes) per row index of one output shard, from its format's layout."""
    originals: dict[int, bytes] = {}
    refined: dict[int, bytes] = {}
    view = shard.view
    if view is None or not idx:
        return originals, refined
    fmt = get_format(view.format)
    try:
        rows = pa.Table.from_pylist([{} for _ in idx])
        names = [n for n in fmt.image_keys(view, shard.names) if n in shard.names]
        if names:
            cols = {n: [v for _, v in sorted(_take(fs, shard.path, n, idx).items())] for n in names}
            order = sorted(set(idx))
            rows = pa.table(cols) if cols else rows
            pos = {i: k for k, i in enumerate(order)}
            rows = rows.take(pa.array([pos[i] for i in idx]))
        for i, (data, _) in zip(idx, fmt.images(view, rows, idx, final=False)):
            if data is not None:
                originals[i] = data
        if mode == "refine":
            for i, (data, _) in zip(idx, fmt.images(view, rows, idx, final=True)):
                if data is not None:
                    refined[i] = data
    except (OSError, pa.ArrowInvalid, InputError):
        pass  # input moved or unreadable: the cells say "not available"
    return originals, refined


def _read_file(path: str, fs: pafs.FileSystem | None = None) -> bytes | None:
    try:
        if fs is None:
            fs, path = resolve_fs(path)
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, pa.ArrowInvalid, InputError):
        return None


def _phrases(rows: list[Row]) -> str:
    counts = Counter(ph for r in rows if r.status == C.STATUS_OK for ph in r.unmatched)
    n_items = sum(1 for r in rows if r.status == C.STATUS_OK and r.unmatched)
    if not counts:
        return '<section id="phrases"><h2>Unmatched phrases</h2><p class="note">no unmatched phrases.</p></section>'
    top = counts.most_common(N_PHRASES)
    peak = top[0][1]
    trs = "".join(
        f'<tr class="phrase"><td>{_e(ph)}</td><td class="num" data-count="phrase">{c}</td>'
        f'<td><span class="bar" style="width:{max(2, round(160 * c / peak))}px"></span></td></tr>'
        for ph, c in top)
    return (f'<section id="phrases"><h2>Most frequent unmatched phrases</h2><p class="note">{len(counts)} distinct '
            f"phrases unmatched in {n_items} items (AQ-Map defects: a noun missing, or its modifiers not drawn).</p>"
            f'<table><tr><th>phrase</th><th>items</th><th></th></tr>{trs}</table></section>')


def _config(manifest: dict) -> str:
    models = manifest.get("models") or {}
    trs = "".join(f'<tr><td>{_e(k)}</td><td class="model">{_e(v if v not in (None, "") else "-")}</td></tr>'
                  for k, v in models.items())
    pk = manifest.get("packages") or {}
    pk_line = ", ".join(f"{k} {v}" for k, v in pk.items() if v)
    rc = manifest.get("result_config") or {}
    return (f'<section id="config"><h2>Models and config</h2><table class="kv" id="models">{trs}</table>'
            f'<p class="note">packages: {_e(pk_line) or "-"}</p>'
            f'<details open><summary>resolved config (hash {_e(manifest.get("config_hash"))})</summary>'
            f"<pre>{_e(json.dumps(rc, indent=2, sort_keys=True, default=str), keep_newlines=True)}</pre></details></section>")
