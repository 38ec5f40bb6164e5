"""`eval` plumbing: sources, MOS columns, skipped items, correlations, table and JSON.

A fake scorer whose p is the image brightness (and a the prompt length) makes the expected
correlations known; one end-to-end run uses the real tiny preset (numbers without meaning).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grefine_curate.curate.errors import InputError
from grefine_curate.curate.results import AQResult, PQResult, ScoreResult
from grefine_curate.pipelines import evaluate as ev

N = 24


def _jpeg(level: int, size=(96, 64)) -> bytes:
    rng = np.random.default_rng(level)
    arr = np.clip(level + rng.normal(0, 8, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class BrightnessScorer:
    """p = mean brightness; a = prompt length / 100. Records the image sizes it was given."""

    def __init__(self):
        self.sizes = []
        self.calls = 0

    def score(self, images, prompts):
        self.calls += 1
        out = []
        for img, prompt in zip(images, prompts):
            self.sizes.append(img.size)
            if prompt == "explode":
                raise RuntimeError("scorer failed on this item")
            p = float(np.asarray(img, dtype=np.float32).mean() / 255.0)
            pqr = PQResult(p=p, factors={}, P=np.zeros((2, 2), np.float32))
            aqr = None if prompt is None else AQResult(a=len(prompt) / 100.0, clip_score=0.5, A=np.zeros((2, 2), np.float32))
            out.append(ScoreResult(pq=pqr, aq=aqr))
        return out


def _table(levels, mos, prompts, align=None, image_struct=False):
    images = [_jpeg(v) if v is not None else b"not an image" for v in levels]
    cols = {
        "image": [{"bytes": b, "path": None} for b in images] if image_struct else images,
        "prompt": prompts,
        "mos": mos,
    }
    if align is not None:
        cols["align_mos"] = align
    return pa.table(cols)


@pytest.fixture
def parquet_data(tmp_path):
    rng = np.random.default_rng(0)
    levels = np.linspace(20, 235, N).astype(int)
    mos = (levels / 50.0 + rng.normal(0, 0.2, N)).tolist()
    prompts = ["x" * int(k) for k in rng.integers(5, 60, N)]
    align = [len(p) / 10.0 + float(rng.normal(0, 0.3)) for p in prompts]
    levels = [int(v) for v in levels]
    levels[3] = None  # a broken image
    mos[5] = None  # a missing MOS
    mos[6] = float("nan")
    prompts[7] = None  # no prompt: scored for p, left out of a
    d = tmp_path / "data"
    d.mkdir()
    pq.write_table(_table(levels[:12], mos[:12], prompts[:12], align[:12]), d / "part-0.parquet")
    pq.write_table(_table(levels[12:], mos[12:], prompts[12:], align[12:], image_struct=True), d / "part-1.parquet")
    return d


def test_evaluate_fake_scorer_known_correlations(parquet_data, tiny_preset):
    scorer = BrightnessScorer()
    rep = ev.evaluate(str(parquet_data), "mos", "align_mos", preset=tiny_preset, batch_size=5,
                      n_bootstrap=200, progress=False, scorer=scorer)
    assert rep.n_items == N
    assert rep.n_scored == N - 3  # one broken image, two missing MOS
    assert {s.item for s in rep.skipped} == {"part-0.parquet#3", "part-0.parquet#5", "part-0.parquet#6"}
    assert rep.skip_reasons() == {"missing MOS 'mos'": 2, "cannot decode image": 1}
    p = rep.scores["p"].correlation
    assert p.n == N - 3 and p.srcc > 0.9 and p.plcc > 0.9
    assert p.srcc_ci95[0] <= p.srcc <= p.srcc_ci95[1]
    a = rep.scores["a"].correlation
    assert a.n == N - 4 and a.srcc > 0.8  # the item without prompt is left out of a
    assert any("no prompt" in n for n in rep.notes)

    blob = json.loads(json.dumps(rep.to_json()))
    for key in ("p", "a"):
        s = blob["scores"][key]
        assert isinstance(s["srcc"], float) and isinstance(s["plcc"], float)
        assert len(s["srcc_ci95"]) == 2 and "plcc_fitted" in s
    assert blob["scores"]["p"]["against"] == "mos" and blob["scores"]["a"]["against"] == "align_mos"
    assert blob["n_skipped"] == 3 and blob["skipped"][0]["reason"]

    table = ev.format_table(rep)
    assert "PQ-Map p" in table and "AQ-Map a" in table and "SRCC" in table and "0.7073" in table
    assert "part-0.parquet#3" in table
    # Table 7 is not a like-for-like target, and the table says why next to its numbers
    t7 = next(line for line in table.splitlines() if "Table 7" in line)
    assert "0.6117" in t7 and "ImageReward" in t7 and "zero-shot" in t7


def test_struct_image_stored_by_path(tmp_path, tiny_preset):
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg(40 * (i + 1)))
    images = pa.array([{"bytes": None, "path": f"{i}.jpg"} for i in range(4)],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": images, "mos": [1.0, 2.0, 3.0, 4.0]}), tmp_path / "x.parquet")
    rep = ev.evaluate(str(tmp_path / "x.parquet"), "mos", preset=tiny_preset, n_bootstrap=0, progress=False,
                      scorer=BrightnessScorer())
    assert rep.n_scored == 4 and rep.scores["p"].correlation.srcc == pytest.approx(1.0)


def test_scoring_decodes_at_reduced_size(tmp_path, tiny_preset):
    rows = 4
    big = [_jpeg(40 * (i + 1), size=(1024, 768)) for i in range(rows)]
    pq.write_table(pa.table({"image": big, "mos": [1.0, 2.0, 3.0, 4.0]}), tmp_path / "x.parquet")
    scorer = BrightnessScorer()
    ev.evaluate(str(tmp_path / "x.parquet"), "mos", preset=tiny_preset, n_bootstrap=0, progress=False, scorer=scorer)
    # draft mode: 1024x768 -> 1/2 scale, the smallest DCT scale that keeps both sides >= 224
    assert scorer.sizes == [(512, 384)] * rows


def test_missing_mos_column_names_columns_found(parquet_data, tiny_preset):
    with pytest.raises(InputError, match=r"no MOS column 'MOS'.*columns found: image .*mos"):
        ev.evaluate(str(parquet_data), "MOS", preset=tiny_preset, progress=False, scorer=BrightnessScorer())
    with pytest.raises(InputError, match="no MOS column 'quality'"):
        ev.evaluate(str(parquet_data), "mos", "quality", preset=tiny_preset, progress=False, scorer=BrightnessScorer())


def test_one_failing_item_does_not_sink_its_batch(tmp_path, tiny_preset):
    prompts = ["fine prompt"] * 6
    prompts[2] = "explode"
    pq.write_table(_table([30, 60, 90, 120, 150, 180], [1.0, 2, 3, 4, 5, 6], prompts), tmp_path / "x.parquet")
    rep = ev.evaluate(str(tmp_path / "x.parquet"), "mos", preset=tiny_preset, batch_size=6, n_bootstrap=0,
                      progress=False, scorer=BrightnessScorer())
    assert rep.n_scored == 5
    assert [s.item for s in rep.skipped] == ["x.parquet#2"] and "scoring failed" in rep.skipped[0].reason


def test_too_few_items_is_an_error(tmp_path, tiny_preset):
    pq.write_table(_table([None, None, 50, 60], [1.0, 2.0, 3.0, 4.0], ["a"] * 4), tmp_path / "x.parquet")
    with pytest.raises(InputError, match=r"only 2 of 4 items could be scored.*cannot decode image x2"):
        ev.evaluate(str(tmp_path / "x.parquet"), "mos", preset=tiny_preset, progress=False, scorer=BrightnessScorer())


def test_image_folder_with_metadata(tmp_path, tiny_preset):
    folder = tmp_path / "imgs"
    folder.mkdir()
    lines = []
    for i, level in enumerate(range(30, 230, 25)):
        (folder / f"{i:02d}.jpg").write_bytes(_jpeg(level))
        lines.append(json.dumps({"file_name": f"{i:02d}.jpg", "text": "a cat" * (i + 1), "mos": level / 10, "align": i}))
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    rep = ev.evaluate(str(folder), "mos", "align", preset=tiny_preset, n_bootstrap=50, progress=False,
                      scorer=BrightnessScorer())
    assert rep.n_scored == 8 and not rep.skipped
    assert rep.scores["p"].correlation.srcc == pytest.approx(1.0)
    assert rep.scores["a"].correlation.srcc == pytest.approx(1.0)
    with pytest.raises(InputError, match=r"no MOS field 'dmos'.*fields found: file_name, text, mos, align"):
        ev.evaluate(str(folder), "dmos", preset=tiny_preset, progress=False, scorer=BrightnessScorer())
    with pytest.raises(InputError, match="no MOS field 'dmos'"):
        ev.iter_eval_items(str(folder), "dmos")  # checked up front, like a Parquet column: before any image is read


def test_end_to_end_tiny_preset(parquet_data, tiny_preset):
    rep = ev.evaluate([str(parquet_data)], "mos", "align_mos", preset="tiny", batch_size=8, n_bootstrap=100,
                      progress=False)
    blob = json.loads(json.dumps(rep.to_json()))
    assert blob["n_scored"] == N - 3 and blob["preset"] == "tiny"
    for key in ("p", "a"):
        s = blob["scores"][key]
        assert s["n"] == (N - 3 if key == "p" else N - 4)
        assert s["srcc"] is None or -1.0 <= s["srcc"] <= 1.0  # random weights: any value, but a valid one
        assert s["plcc"] is None or -1.0 <= s["plcc"] <= 1.0
    assert "tiny preset" in ev.format_table(rep)
