"""The HTML report: built from a job output folder written here in the job's format, then opened in
a real headless Chromium (Debian's package) over the DevTools protocol (a pipe, no extra package):
a screenshot is taken and the DOM is checked (sections, counts, thresholds, decoded images)."""

from __future__ import annotations

import io
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grefine_curate.curate.config import load_preset
from grefine_curate.curate.errors import InputError
from grefine_curate.curate.images import map_to_png
from grefine_curate.pipelines import columns as C
from grefine_curate.pipelines.report import write_report

SECTIONS = ["summary", "counts", "histograms", "filter", "worst", "best", "routes", "phrases", "items", "config"]


def section(text: str, sid: str) -> str:
    """The HTML of one report section."""
    start = text.index(f'<section id="{sid}"')
    return text[start:text.index("</section>", start)]


def _jpeg(seed: int, size=(160, 120)) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    grad = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1.0, (1, 1, 3))
    arr = np.clip(grad + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=88)
    return buf.getvalue()


def _map(seed: int) -> bytes:
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    c = np.random.default_rng(seed).uniform(0.2, 0.8, 2)
    return map_to_png(np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) * 8))


# (route, p, a, p_after, a_after, unmatched, prompt); None route = an error row
ROWS = [
    ("skip", 0.91, 0.88, 0.91, 0.88, [], "a lighthouse at sunset"),
    ("light", 0.62, 0.75, 0.70, 0.78, ["red sofa"], "a cat on a red sofa"),
    ("full", 0.21, 0.40, 0.55, 0.61, ["red sofa", "blue hat"], "a cat on a red sofa with a blue hat"),
    ("full", 0.35, 0.30, 0.52, 0.58, ["green apple"], "a bowl of fruit with a green apple"),
    ("reverted", 0.45, 0.66, 0.45, 0.66, ["red sofa"], "a dog on a red sofa"),
    (None, None, None, None, None, None, "a broken image"),
    ("light", 0.58, None, 0.63, None, [], None),  # no prompt: no a, no AQ map
    ("skip", 0.80, 0.92, 0.80, 0.92, [], "two dogs in the snow"),
]


def make_job_output(root: Path, save_maps: bool = True) -> tuple[Path, Path]:
    """An input shard and the OUT folder a refine run with --save-maps writes for it."""
    inp = root / "input" / "part-0.parquet"
    out = root / "out"
    inp.parent.mkdir(parents=True)
    originals = [_jpeg(i) for i in range(len(ROWS))]
    originals[5] = b"corrupt"
    prompts = [r[6] for r in ROWS]
    pq.write_table(pa.table({"image": pa.array(originals, pa.binary()), "prompt": pa.array(prompts, pa.string())}),
                   inp, row_group_size=3)
    refined = [Image.eval(Image.open(io.BytesIO(b)), lambda v: 255 - v) if r[0] in ("light", "full") else None
               for b, r in zip(originals, ROWS)]
    image_out = []
    for b, img in zip(originals, refined):
        if img is None:
            image_out.append(b)
        else:
            buf = io.BytesIO()
            img.save(buf, "PNG")
            image_out.append(buf.getvalue())
    ok = [r[0] is not None for r in ROWS]
    cols = {
        "image": pa.array(image_out, pa.binary()),
        "prompt": pa.array(prompts, pa.string()),
        C.STATUS: pa.array([C.STATUS_OK if k else C.STATUS_ERROR for k in ok]),
        C.ERROR: pa.array([None if k else "part-0.parquet#5: cannot decode image (UnidentifiedImageError)" for k in ok]),
        C.ROUTE: pa.array([r[0] for r in ROWS], pa.string()),
        C.PQ_SCORE: pa.array([r[1] for r in ROWS], pa.float32()),
        C.AQ_SCORE: pa.array([r[2] for r in ROWS], pa.float32()),
        C.PQ_SCORE_AFTER: pa.array([r[3] for r in ROWS], pa.float32()),
        C.AQ_SCORE_AFTER: pa.array([r[4] for r in ROWS], pa.float32()),
        C.UNMATCHED: pa.array([r[5] for r in ROWS], pa.list_(pa.string())),
        C.SEED: pa.array([i if k else None for i, k in enumerate(ok)], pa.int64()),
    }
    if save_maps:
        cols[C.PQ_MAP] = pa.array([_map(i) if k else None for i, k in enumerate(ok)], pa.binary())
        cols[C.AQ_MAP] = pa.array([_map(100 + i) if k and r[2] is not None else None
                                   for i, (k, r) in enumerate(zip(ok, ROWS))], pa.binary())
    out.mkdir()
    pq.write_table(pa.table(cols), out / "part-0.parquet", row_group_size=3)
    preset = load_preset("tiny", {"routing": {"skip_p": 0.75, "light_p": 0.4}})
    manifest = {
        "manifest_version": 1, "state": "done", "exit_code": 0, "config_hash": "0123456789abcdef",
        "preset": "tiny",
        "models": {"clip": "tiny/random", "pq_prompts": "zero-shot", "spacy": "en_core_web_sm",
                   "refiner_kind": "tiny", "inpaint": None, "img2img": None},
        "packages": {"python": "3.11", "torch": "2.14.1"},
        "result_config": {"preset": preset.to_dict(), "mode": "refine", "save_maps": save_maps,
                          "keep_images": False, "image_format": "PNG",
                          "columns": {"image": None, "prompt": None, "id": None}, "draft_size": None},
        "inputs": [{"shard": "part-0.parquet", "input": str(inp), "rows": len(ROWS), "row_cap": None}],
        "counts": {"rows": len(ROWS)},
        "run": {"wall_s": 3.2, "items_per_s": 2.5, "executor": "local", "workers": 1},
    }
    (out / "__grefine__").mkdir()
    (out / "__grefine__" / "manifest.json").write_text(json.dumps(manifest))
    return inp, out


# ---------------------------------------------------------------------------------------------
# Without a browser


def test_report_html_is_self_contained(tmp_path):
    _, out = make_job_output(tmp_path)
    path = write_report(out, n_worst=4)
    assert path == out / "__grefine__" / "report.html"
    text = path.read_text()
    for sid in SECTIONS:
        assert f'id="{sid}"' in text
    assert "http://" not in text and "https://" not in text  # nothing fetched from the network
    # 4 worst (p 0.21, 0.35, 0.45, 0.58) x 4 cells, minus the reverted item's refined image and the
    # no-prompt item's AQ map
    assert section(text, "worst").count("<img ") == 4 * 4 - 2
    assert "reverted: the guard kept the original" in text and "no prompt: no AQ map" in text
    assert "run with --save-maps" not in text
    assert 'data-threshold="skip_p"' in text and 'data-threshold="light_a"' in text
    assert 'data-count="route:full">2<' in text and 'data-count="status:error">1<' in text
    assert "cannot decode image (UnidentifiedImageError)" in text  # most frequent errors, prefix stripped


def test_report_without_maps_says_how_to_get_them(tmp_path):
    _, out = make_job_output(tmp_path, save_maps=False)
    text = write_report(out).read_text()
    assert "run with --save-maps to see maps" in text
    assert section(text, "worst").count('data-role="pq"') == 7  # every ok row listed (n_worst 24 > 7 ok rows)


def test_report_original_missing_is_said_not_crashed(tmp_path):
    inp, out = make_job_output(tmp_path)
    inp.unlink()
    text = write_report(out, n_worst=3).read_text()
    assert section(text, "worst").count("original not available") == 3


def test_report_needs_a_manifest(tmp_path):
    with pytest.raises(InputError, match="no __grefine__/manifest.json"):
        write_report(tmp_path)


def _manifest(out: Path, mode: str, inputs: list[dict]) -> None:
    preset = load_preset("tiny")
    (out / "__grefine__").mkdir(parents=True)
    (out / "__grefine__" / "manifest.json").write_text(json.dumps({
        "state": "done", "exit_code": 0, "preset": "tiny", "models": {"clip": "tiny/random"},
        "result_config": {"preset": preset.to_dict(), "mode": mode, "columns": {"image": None}},
        "inputs": inputs}))


def test_report_folder_input_refine(tmp_path):
    """Image-folder inputs: originals beside the input, refined images under OUT/images/<same path>."""
    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    rels = ["a.jpg", "sub/b.jpg", "c.jpg"]
    for i, rel in enumerate(rels):
        (src / rel).write_bytes(_jpeg(i))
    out = tmp_path / "out"
    (out / "images" / "sub").mkdir(parents=True)
    for rel in rels[:2]:  # a (full) and b (light) were refined; c was skipped
        (out / "images" / rel).write_bytes(_jpeg(50))
    (out / "scores").mkdir()
    pq.write_table(pa.table({
        C.ID: rels, C.SOURCE: rels, C.PROMPT: ["a cat", "a dog", "a car"],
        C.STATUS: ["ok"] * 3, C.ERROR: pa.array([None] * 3, pa.string()), C.ROUTE: ["full", "light", "skip"],
        C.PQ_SCORE: pa.array([0.2, 0.5, 0.9], pa.float32()), C.AQ_SCORE: pa.array([0.3, 0.6, 0.9], pa.float32()),
        C.PQ_SCORE_AFTER: pa.array([0.4, 0.6, 0.9], pa.float32()), C.AQ_SCORE_AFTER: pa.array([0.5, 0.7, 0.9], pa.float32()),
        C.UNMATCHED: pa.array([["cat"], [], []], pa.list_(pa.string())),
    }), out / "scores" / "imgs-00000.parquet")
    _manifest(out, "refine", [{"shard": "scores/imgs-00000.parquet", "input": str(src), "rows": 3}])
    text = write_report(out).read_text()
    worst = section(text, "worst")
    assert worst.count('data-role="original"><img') == 3
    assert worst.count('data-role="refined"><img') == 2 and "route skip: kept as is" in worst
    assert "in OUT: images/sub/b.jpg (scores: scores/imgs-00000.parquet row 1)" in worst
    assert "run with --save-maps to see maps" in text


def test_report_score_mode(tmp_path):
    inp, _ = make_job_output(tmp_path)  # reuse its input shard
    out = tmp_path / "score-out"
    out.mkdir()
    pq.write_table(pa.table({
        C.ID: ["r0", "r1", "r2"], C.PROMPT: ["x", None, "z"], C.STATUS: ["ok", "ok", "error"],
        C.ERROR: [None, None, "r2: cannot decode image"], C.PQ_SCORE: pa.array([0.3, 0.6, None], pa.float32()),
        C.AQ_SCORE: pa.array([0.5, None, None], pa.float32()),
        C.UNMATCHED: pa.array([["x"], [], None], pa.list_(pa.string())),
    }), out / "part-0.parquet")
    _manifest(out, "score", [{"shard": "part-0.parquet", "input": str(inp), "rows": 3}])
    text = write_report(out).read_text()
    assert "score mode: no routing or refinement" in text and "score mode: not refined" in text
    assert 'data-count="status:error">1<' in text and "route:" not in text
    assert section(text, "worst").count('data-role="original"><img') == 2  # originals found in the input by row index


# ---------------------------------------------------------------------------------------------
# In a real browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class _CDP:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fd 3 in, fd 4 out)."""

    def __init__(self, binary: str, profile: Path):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def wire() -> None:  # in the child: the pipe ends become fds 3 and 4
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900",
                 "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen([binary, *flags], preexec_fn=wire, pass_fds=(3, 4),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._next = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("no answer from chromium over the DevTools pipe")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read_message(deadline))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - it is going away either way
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._r)
        os.close(self._w)


DOM_FACTS = """(() => {
  const imgs = [...document.querySelectorAll('#worst img')];
  const ids = %s;
  return {
    sections: ids.filter(i => { const e = document.getElementById(i); return e && e.getBoundingClientRect().height > 0; }),
    counts: Object.fromEntries([...document.querySelectorAll('[data-count^="route:"],[data-count^="status:"]')]
                               .map(e => [e.dataset.count, Number(e.textContent)])),
    items: document.querySelectorAll('#worst tr.item').length,
    images: imgs.length,
    decoded: imgs.filter(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0).length,
    thresholds: [...document.querySelectorAll('[data-threshold]')].map(e => e.dataset.threshold),
    thresholdLabels: [...document.querySelectorAll('text.thl')].map(e => e.textContent),
    histBars: document.querySelectorAll('#hist-p rect.before').length,
    histWidth: document.getElementById('hist-p').getBoundingClientRect().width,
    phrases: [...document.querySelectorAll('#phrases tr.phrase')].map(r => [r.cells[0].textContent, Number(r.cells[1].textContent)]),
    models: [...document.querySelectorAll('#models td.model')].map(e => e.textContent),
    external: [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') || e.getAttribute('href'))
              .filter(u => !u.startsWith('data:')),
    height: document.documentElement.scrollHeight,
  };
})()"""


FILTER_FACTS = r"""(() => {
  const set = (id, v) => { const e = document.getElementById(id); e.value = v; e.dispatchEvent(new Event("input")); };
  const shown = () => [...document.querySelectorAll('#worst tr.item')].filter(r => r.style.display !== "none").length;
  const initial = document.getElementById("f-count").textContent;
  set("f-text", "red sofa"); const phrase = shown();
  set("f-pmin", "0.3"); set("f-pmax", "0.5"); const range = shown();
  set("f-text", ""); set("f-pmin", ""); set("f-pmax", ""); set("f-route", "full"); const route = shown();
  const tab = getComputedStyle(document.getElementById("route-skip")).display;
  return {initial, phrase, range, route, tab};
})()"""


def test_report_renders_in_headless_chromium(tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium; .ci/run installs it where it can)")
    _, out = make_job_output(tmp_path)
    path = write_report(out, n_worst=6)
    browser = _CDP(binary, tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.call("Page.enable", session=session)
        browser.call("Network.enable", session=session)
        browser.call("Page.navigate", {"url": path.resolve().as_uri()}, session=session)
        browser.wait_event("Page.loadEventFired")
        facts = browser.call("Runtime.evaluate", {"expression": DOM_FACTS % json.dumps(SECTIONS),
                                                  "returnByValue": True}, session=session)["result"]["value"]
        height = min(int(facts["height"]), 6000)
        shot = browser.call("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1}}, session=session, timeout=60)
        requests = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
        filtered = browser.call("Runtime.evaluate", {"expression": FILTER_FACTS, "returnByValue": True},
                                session=session)["result"]["value"]
    finally:
        browser.close()

    import base64

    png = base64.b64decode(shot["data"])
    (tmp_path / "report.png").write_bytes(png)
    keep = os.environ.get("GREFINE_REPORT_SCREENSHOT")  # set to a path to keep the screenshot for a look
    if keep:
        Path(keep).write_bytes(png)
    img = Image.open(io.BytesIO(png))
    assert img.size == (1280, height)
    assert np.asarray(img.convert("L")).std() > 10  # a rendered page, not a blank one

    assert facts["sections"] == SECTIONS
    assert facts["counts"] == {"status:ok": 7, "status:error": 1, "route:skip": 2, "route:light": 2,
                               "route:full": 2, "route:reverted": 1}
    assert facts["items"] == 6
    # 6 worst items x (original, PQ, AQ, refined) minus: the no-prompt item has no AQ map, the reverted
    # and the skipped item no refined image
    assert facts["images"] == 6 * 4 - 3
    assert facts["decoded"] == facts["images"]
    assert sorted(facts["thresholds"]) == ["light_a", "light_p", "skip_a", "skip_p"]
    # drawn from the run's resolved config (the fixture overrides skip_p and light_p)
    tiny_routing = load_preset("tiny").routing  # the fixture overrides skip_p and light_p only
    assert facts["thresholdLabels"] == ["skip_p 0.75", "light_p 0.4", f"skip_a {tiny_routing.skip_a:g}",
                                        f"light_a {tiny_routing.light_a:g}"]
    assert facts["histBars"] > 0 and facts["histWidth"] > 300
    assert facts["phrases"][0] == ["red sofa", 3]
    assert "tiny/random" in facts["models"]
    assert facts["external"] == []
    # the filter: phrase "red sofa" keeps the 3 worst-table items that have it unmatched; then p in [0.3, 0.5]
    assert filtered["phrase"] == 3 and filtered["range"] == 1 and filtered["route"] == 2
    assert filtered["tab"] == "block"  # the first route page is shown
    assert filtered["initial"] == "8 of 8 items shown"  # 7 scored items and the error row, each counted once
    assert all(u.startswith(("file:", "data:")) for u in requests), requests


# ---------------------------------------------------------------------------------------------
# For curating: best items, a page per route, filter data, locations, random-weights banner


def test_report_best_route_pages_items_table_and_banner(tmp_path):
    _, out = make_job_output(tmp_path)
    text = write_report(out, n_worst=2, n_best=2, n_route=1, n_table=5).read_text()
    best = section(text, "best")
    assert best.count('<tr class="item"') == 2
    assert 'data-p="0.91' in best and 'data-p="0.8' in best  # highest p first
    routes = section(text, "routes")
    for route, n in (("skip", 2), ("light", 2), ("full", 2), ("reverted", 1)):
        page = routes[routes.index(f'id="route-{route}"'):]
        assert f"route {route}: {n} items; the 1 worst shown" in page
        assert f'<label for="tab-{route}">{route} ({n})</label>' in routes
    items = section(text, "items")
    assert items.count('<tr class="item"') == 5 and "the 5 worst of 7 scored items" in items
    assert "in OUT: part-0.parquet row 2" in section(text, "worst")  # the worst item (p 0.21) is row 2
    assert 'data-phrases="[&quot;red sofa&quot;, &quot;blue hat&quot;]"' in text and 'data-route="full"' in text
    assert 'id="f-text"' in section(text, "filter") and "<script>" in text and "src=" not in text.split("<script>")[1].split("</script>")[0]
    assert 'id="random-weights"' in text  # the fixture's manifest says tiny/random


def test_report_without_random_weights_has_no_banner(tmp_path):
    _, out = make_job_output(tmp_path)
    man = json.loads((out / "__grefine__" / "manifest.json").read_text())
    man["models"]["clip"] = "ViT-B-16/openai"
    man["preset"] = man["result_config"]["preset"]["name"] = "sdxl"
    (out / "__grefine__" / "manifest.json").write_text(json.dumps(man))
    assert 'id="random-weights"' not in write_report(out).read_text()


def test_report_shows_the_thresholds_refine_worst_would_choose(tmp_path):
    from grefine_curate.pipelines.thresholds import threshold_at

    _, out = make_job_output(tmp_path)
    text = section(write_report(out).read_text(), "histograms")
    ps = [r[1] for r in ROWS if r[1] is not None]
    assert 'id="quantiles"' in text and f"<td class=num>{threshold_at(np.array(ps), 0.15):.4f}</td>" in text


# ---------------------------------------------------------------------------------------------
# Hostile strings, item counts, error rows, threshold labels, workers (issues 15 and 16)

CONTROLS = "\x00\x1b\x07\x7f\x85\x9b\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")  # newline aside


def test_control_and_bidi_characters_never_reach_the_page(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    names = [f"a{CONTROLS}.jpg", "b\u202egpj.exe.jpg", "c.jpg"]
    (src / names[1]).write_bytes(_jpeg(1))  # the first name holds a NUL: no file system takes it
    out = tmp_path / "out"
    (out / "scores").mkdir(parents=True)
    pq.write_table(pa.table({
        C.ID: [f"id{CONTROLS}", "id\u202eb", "id\x00c"], C.SOURCE: names,
        C.PROMPT: [f"a cat{CONTROLS} on a sofa", "a dog\x1b[31m red", None],
        C.STATUS: ["ok", "ok", "error"],
        C.ERROR: pa.array([None, None, f"c.jpg: not a readable image (\x00\x1b\u202e{CONTROLS})"], pa.string()),
        C.ROUTE: ["full", "light", None],
        C.PQ_SCORE: pa.array([0.2, 0.5, None], pa.float32()), C.AQ_SCORE: pa.array([0.3, 0.6, None], pa.float32()),
        C.PQ_SCORE_AFTER: pa.array([0.4, 0.6, None], pa.float32()),
        C.AQ_SCORE_AFTER: pa.array([0.5, 0.7, None], pa.float32()),
        C.UNMATCHED: pa.array([[f"red{CONTROLS}sofa"], ["dog\u202e"], None], pa.list_(pa.string())),
    }), out / "scores" / "imgs-00000.parquet")
    _manifest(out, "refine", [{"shard": "scores/imgs-00000.parquet", "input": str(src), "rows": 3}])
    text = write_report(out).read_text(encoding="utf-8")
    assert RAW_CONTROL.findall(text) == []
    # made visible, not silently dropped: NUL and ESC as control pictures, the overrides as U+FFFD
    assert "id\u2400\u241b\u2407\u2421\ufffd" in text and "a dog\u241b[31m red" in text
    assert "b\ufffdgpj.exe.jpg" in text and "red\u2400" in text


def _items_of(text: str) -> list[dict[str, str]]:
    """The data-* attributes of every tr.item on the page."""
    from html.parser import HTMLParser

    rows: list[dict[str, str]] = []

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "tr" and "item" in (a.get("class") or "").split():
                rows.append({k[5:]: v or "" for k, v in a.items() if k.startswith("data-")})

    P().feed(text)
    return rows


FILTER_STUB = r"""
const rows = JSON.parse(process.argv[1]), script = process.argv[2], inputs = JSON.parse(process.argv[3]);
const els = {}, listeners = {};
for (const id of ["f-text", "f-pmin", "f-pmax", "f-amin", "f-amax", "f-route"])
  els[id] = {value: inputs[id] || "", addEventListener: () => {}};
els["f-count"] = {textContent: ""};
const trs = rows.map(d => ({dataset: d, style: {display: ""}}));
globalThis.document = {
  getElementById: id => els[id],
  querySelectorAll: sel => trs,
  addEventListener: (ev, f) => { listeners[ev] = f; },
};
eval(script);
listeners["DOMContentLoaded"]();
console.log(els["f-count"].textContent);
"""


@pytest.mark.parametrize("inputs,expected", [({}, "8 of 8 items shown"), ({"f-text": "red sofa"}, "3 of 8 items shown"),
                                             ({"f-route": "full"}, "2 of 8 items shown")])
def test_filter_counts_items_not_rows(tmp_path, inputs, expected):
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node binary to run the filter script")
    _, out = make_job_output(tmp_path)
    text = write_report(out).read_text()
    rows = _items_of(text)
    assert len(rows) > 8  # the same items appear in the galleries, the route pages and the table
    assert len({r["key"] for r in rows}) == 8  # 7 scored items and 1 error row
    script = text[text.index("<script>") + len("<script>"):text.index("</script>")]
    done = subprocess.run([node, "-e", FILTER_STUB, json.dumps(rows), script, json.dumps(inputs)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected


def test_error_rows_are_in_the_items_table_with_their_file(tmp_path):
    inp, out = make_job_output(tmp_path)
    items = section(write_report(out).read_text(), "items")
    assert items.count('<tr class="item error"') == 1
    err = items[items.index('<tr class="item error"'):]
    assert "cannot decode image (UnidentifiedImageError)" in err
    assert f"input: {inp} row 5" in err
    assert "then the error row (1)" in items


def test_error_rows_of_a_folder_name_the_image_file(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    out = tmp_path / "out"
    (out / "scores").mkdir(parents=True)
    pq.write_table(pa.table({
        C.ID: ["ok.jpg", "sub/broken.jpg"], C.SOURCE: ["ok.jpg", "sub/broken.jpg"], C.PROMPT: ["a cat", "a dog"],
        C.STATUS: ["ok", "error"], C.ERROR: [None, "sub/broken.jpg: not a readable image (looks like text)"],
        C.ROUTE: ["skip", None], C.PQ_SCORE: pa.array([0.9, None], pa.float32()),
        C.AQ_SCORE: pa.array([0.9, None], pa.float32()), C.UNMATCHED: pa.array([[], None], pa.list_(pa.string())),
    }), out / "scores" / "imgs-00000.parquet")
    _manifest(out, "refine", [{"shard": "scores/imgs-00000.parquet", "input": str(src), "rows": 2}])
    items = section(write_report(out).read_text(), "items")
    err = items[items.index('<tr class="item error"'):]
    assert f"input: {src}/sub/broken.jpg" in err and "looks like text" in err


def _label_boxes(svg: str) -> tuple[list[float], list[tuple[float, float, float]]]:
    """Threshold line x positions and label boxes (left, right, baseline y), widths estimated."""
    char_w = 6.2  # px per character of 10px system-ui text, an upper estimate
    lines = [float(m) for m in re.findall(r'<line class="thr" x1="([\d.]+)"', svg)]
    boxes = []
    for x, y, anchor, label in re.findall(r'<text class="thl" x="([\d.]+)" y="([\d.]+)"(?: text-anchor="(\w+)")?>([^<]*)<',
                                          svg):
        w = char_w * len(label)
        left = float(x) if anchor == "start" else float(x) - w
        boxes.append((left, left + w, float(y)))
    return lines, boxes


@pytest.mark.parametrize("skip_p,light_p,clear", [(0.75, 0.4, True), (0.42, 0.40, True), (0.5, 0.5, False),
                                                  (0.0, 0.0, False), (0.99, 0.97, False), (1.0, 0.02, True)])
def test_threshold_labels_do_not_overlap(skip_p, light_p, clear):
    from grefine_curate.pipelines.report import _histogram_svg

    svg = _histogram_svg("p", [0.1, 0.5, 0.9], None, [("skip_p", skip_p), ("light_p", light_p)], "hist-p")
    lines, boxes = _label_boxes(svg)
    assert len(boxes) == 2
    (l0, r0, y0), (l1, r1, y1) = boxes
    assert y0 != y1 or r0 <= l1 or r1 <= l0  # two labels never share a box
    assert abs(y0 - y1) >= 12 or y0 == y1  # rows far enough apart for 10px text
    for left, right, _ in boxes:
        assert 40 <= left and right <= 460 - 12  # inside the plot
    if clear:  # room for each label on a side away from the other line: no line crosses a label
        for (left, right, _), own in zip(boxes, lines):
            assert not any(left < x < right for x in lines if x != own)


@pytest.mark.parametrize("run,expected", [
    ({"workers": 1, "units_run": 0, "rows": 0}, "no worker ran: nothing was left to do"),
    ({"workers": 2, "units_run": 5, "rows": 40}, "2 workers ran"),
    ({"workers": 4, "units_run": 1, "rows": 8}, "1 worker ran"),
    ({"workers": 1, "rows": 8}, "1 worker ran"),
])
def test_summary_says_how_many_workers_ran(tmp_path, run, expected):
    _, out = make_job_output(tmp_path)
    man = json.loads((out / "__grefine__" / "manifest.json").read_text())
    man["run"] = {"wall_s": 1.0, "items_per_s": 8.0, "executor": "ray", **run}
    (out / "__grefine__" / "manifest.json").write_text(json.dumps(man))
    summary = section(write_report(out).read_text(), "summary")
    assert f"(ray, {expected})" in summary and "worker(s)" not in summary
