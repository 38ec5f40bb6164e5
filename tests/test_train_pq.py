"""train_pq: learning the four prompt contexts on MOS data with the image encoder frozen.

The learning test uses a synthetic set whose MOS is a known function of the image: random colour
textures blurred with a Gaussian of known radius, MOS = 5 - 4 * radius / 3. The tiny random CLIP
has no notion of quality, so its starting held-out SRCC is near chance; the test measures that
start and requires training to lift it far above.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as papq
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import stats

from grefine_curate.curate.config import FACTORS
from grefine_curate.curate.errors import ConfigError, InputError
from grefine_curate.curate.pq_map import PQMap
from grefine_curate.curate.prompts import LearnedPrompts
from grefine_curate.curate.train_pq import MosSample, train_pq
from grefine_curate.pipelines.labelled import load_training_samples

MAX_RADIUS = 3.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")




def _texture(rng, size=224, cell=2):
    base = rng.integers(0, 256, (size // cell, size // cell, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((size, size), Image.BICUBIC)


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def blur_set():
    """64 blurred random textures at 224 px with MOS = 5 - 4 * radius / MAX_RADIUS."""
    rng = np.random.default_rng(0)
    images, mos = [], []
    for _ in range(64):
        radius = float(rng.uniform(0, MAX_RADIUS))
        images.append(_texture(rng).filter(ImageFilter.GaussianBlur(radius=radius)))
        mos.append(5.0 - 4.0 * radius / MAX_RADIUS)
    return images, np.array(mos)


@pytest.fixture(scope="module")
def blur_parquet(blur_set, tmp_path_factory):
    images, mos = blur_set
    path = tmp_path_factory.mktemp("blur") / "blur.parquet"
    papq.write_table(pa.table({"image": [_png(im) for im in images], "mos": mos}), path)
    return path


def _small_images(n=12, seed=1):
    rng = np.random.default_rng(seed)
    return [_texture(rng, size=32, cell=4) for _ in range(n)], rng.uniform(1, 5, n)


def _train(data, out, mos_columns=None, image_column=None, **kw):
    """train-pq as the CLI runs it: the shared reader streams the items into train_pq."""
    samples = load_training_samples(str(data), mos_columns or {"overall": "mos"}, image_column=image_column)
    return train_pq(samples, out, mos_columns=mos_columns, data_name=str(data), **kw)


def _held_out_srcc(clip, preset, prompts, images, mos):
    results = PQMap(clip, preset.pq, surgery_blocks=preset.clip.surgery_blocks, prompts=prompts).score(images)
    return stats.spearmanr([r.p for r in results], mos)[0]


def test_training_lifts_held_out_srcc_well_above_its_start(blur_set, blur_parquet, preset, clip, tmp_path):
    images, mos = blur_set
    out = tmp_path / "trained.safetensors"
    report = _train(blur_parquet, out, preset=preset, epochs=12, lr=2e-3, batch_size=8, val_fraction=0.25,
                      seed=0, clip=clip, progress=False)
    assert (report.n_train, report.n_val) == (48, 16) and report.skipped == []
    assert [h.epoch for h in report.history] == list(range(13))
    start = report.history[0].srcc

    # the start, measured independently through inference with the initial ("X" placeholder) contexts
    val = [int(name.rsplit("#", 1)[1]) for name in report.val_items]
    initial = LearnedPrompts.from_placeholders(clip.model, clip.tokenizer)
    measured_start = _held_out_srcc(clip, preset, initial, [images[i] for i in val], mos[val])
    assert measured_start == pytest.approx(start, abs=1e-6)

    assert report.best_srcc >= start + 0.4, f"held-out SRCC {start:.3f} -> {report.best_srcc:.3f}"
    assert report.best_srcc >= 0.8
    assert report.best_epoch >= 1 and report.best_srcc == max(h.srcc for h in report.history)

    # the file holds the best epoch: inference with it reproduces the reported held-out SRCC
    trained = LearnedPrompts.load(out)
    assert trained.file_metadata["trained_epoch"] == str(report.best_epoch)
    assert _held_out_srcc(clip, preset, str(out), [images[i] for i in val], mos[val]) == pytest.approx(
        report.best_srcc, abs=1e-6)
    json.dumps(report.to_json())  # a report the CLI can print


def test_folder_with_metadata_csv_skips_and_reports_bad_items(preset, clip, tmp_path):
    images, mos = _small_images()
    folder = tmp_path / "data"
    folder.mkdir()
    lines = ["file_name,mos,tech"]
    for i, (im, m) in enumerate(zip(images, mos)):
        im.save(folder / f"{i}.png")
        lines.append(f"{i}.png,{m},{'' if i == 3 else 6 - m}")
    (folder / "broken.png").write_bytes(b"not an image")
    images[0].save(folder / "nomos.png")
    images[0].save(folder / "unlisted.png")  # an image without a metadata row has no MOS either
    lines += ["broken.png,3.0,3.0", "nomos.png,,2.0"]
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    report = _train(folder, tmp_path / "p.safetensors", preset=preset, epochs=2, clip=clip, progress=False,
                      mos_columns={"overall": "mos", "technical": "tech"})
    assert report.n_train + report.n_val == 12
    reasons = dict(report.skipped)
    assert set(reasons) == {"broken.png", "nomos.png", "unlisted.png"}
    assert "not a readable image" in reasons["broken.png"]
    assert "MOS (mos) missing" in reasons["nomos.png"] and "MOS (mos) missing" in reasons["unlisted.png"]
    assert set(report.history[-1].factor_srcc) == set(FACTORS)


def test_jsonl_folder_and_fixed_factors_keep_their_contexts(preset, clip, tmp_path):
    images, mos = _small_images(seed=2)
    folder = tmp_path / "data"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as fh:
        for i, (im, m) in enumerate(zip(images, mos)):
            im.save(folder / f"{i}.jpg")
            fh.write(json.dumps({"file_name": f"{i}.jpg", "score": float(m)}) + "\n")
    out = tmp_path / "p.safetensors"
    report = _train(folder, out, preset=preset, epochs=3, clip=clip, progress=False, lr=1e-2,
                      mos_columns={"overall": "score"}, unlabelled="fixed", select="overall")
    assert report.trained_factors == ["overall"]
    start = LearnedPrompts.from_placeholders(clip.model, clip.tokenizer)
    saved = LearnedPrompts.load(out)
    for f in FACTORS[1:]:
        assert torch.equal(saved.ctx[f], start.ctx[f].detach()), f"{f} changed although fixed"
    if report.best_epoch > 0:
        assert not torch.equal(saved.ctx["overall"], start.ctx["overall"].detach())


def test_hf_image_struct_column_and_epoch_zero(preset, clip, tmp_path):
    images, mos = _small_images(seed=3)
    (tmp_path / "img").mkdir()
    cells = []
    for i, im in enumerate(images):
        if i % 2:  # half as bytes, half as a path relative to the Parquet file
            im.save(tmp_path / "img" / f"{i}.png")
            cells.append({"bytes": None, "path": f"img/{i}.png"})
        else:
            cells.append({"bytes": _png(im), "path": None})
    path = tmp_path / "hf.parquet"
    papq.write_table(pa.table({"img": cells, "quality": mos}), path)
    out = tmp_path / "p.safetensors"
    report = _train(path, out, preset=preset, epochs=0, clip=clip, progress=False, image_column="img",
                      mos_columns={"overall": "quality"})
    assert report.n_train + report.n_val == 12 and report.best_epoch == 0 and len(report.history) == 1
    assert LearnedPrompts.load(out).file_metadata["trained_epoch"] == "0"


def test_missing_columns_name_what_was_found(preset, clip, tmp_path):
    images, mos = _small_images(n=4)
    path = tmp_path / "d.parquet"
    papq.write_table(pa.table({"image": [_png(im) for im in images], "MOS": mos}), path)
    with pytest.raises(InputError, match=r"no MOS column 'mos'; columns found: image \(binary\), MOS \(double\)"):
        _train(path, tmp_path / "p.safetensors", preset=preset, clip=clip, progress=False)
    folder = tmp_path / "f"
    folder.mkdir()
    images[0].save(folder / "a.png")
    (folder / "metadata.csv").write_text("file,mos\na.png,3\n")
    with pytest.raises(InputError, match=r"file_name.*fields found: file, mos"):
        _train(folder, tmp_path / "p.safetensors", preset=preset, clip=clip, progress=False)
    (folder / "metadata.csv").unlink()
    with pytest.raises(InputError, match=r"no MOS field 'mos' in metadata.jsonl / metadata.csv.*no metadata file"):
        _train(folder, tmp_path / "p.safetensors", preset=preset, clip=clip, progress=False)
    with pytest.raises(InputError, match="no such file or directory"):
        _train(tmp_path / "missing", tmp_path / "p.safetensors", preset=preset, clip=clip, progress=False)


def test_samples_built_in_code_and_nothing_usable(preset, clip, tmp_path):
    images, mos = _small_images(n=8, seed=4)
    samples = [MosSample(f"s{i}", im, {"mos": float(m)}) for i, (im, m) in enumerate(zip(images, mos))]
    samples.append(MosSample("gone", None, {"mos": 3.0}, error="cannot read file (gone)"))
    report = train_pq(iter(samples), tmp_path / "p.safetensors", preset=preset, epochs=1, clip=clip,
                      progress=False)  # a one-pass iterator is enough
    assert report.n_train + report.n_val == 8 and report.skipped == [("gone", "gone: cannot read file (gone)")]
    assert LearnedPrompts.load(tmp_path / "p.safetensors").file_metadata["source"].startswith("train_pq on samples")
    with pytest.raises(InputError, match="has no numeric values"):
        train_pq([MosSample("a", images[0], {"mos": None})] * 6, tmp_path / "q.safetensors", preset=preset,
                 clip=clip, progress=False)
    with pytest.raises(InputError, match="none of the 6 images .* could be decoded"):
        train_pq([MosSample("a", b"junk", {"mos": 1.0})] * 6, tmp_path / "q.safetensors", preset=preset,
                 clip=clip, progress=False)
    with pytest.raises(TypeError, match="load_training_samples"):
        train_pq(str(tmp_path), tmp_path / "q.safetensors", preset=preset, clip=clip, progress=False)


def test_bad_options_are_refused(preset, clip, tmp_path):
    images, mos = _small_images(n=4)
    path = tmp_path / "d.parquet"
    papq.write_table(pa.table({"image": [_png(im) for im in images], "mos": mos}), path)
    with pytest.raises(ConfigError, match="overall"):
        _train(path, tmp_path / "p.safetensors", preset=preset, clip=clip, mos_columns={"technical": "mos"})
    with pytest.raises(ConfigError, match="val_fraction"):
        _train(path, tmp_path / "p.safetensors", preset=preset, clip=clip, val_fraction=0.0)
    with pytest.raises(ConfigError, match="width 512"):
        _train(path, tmp_path / "p.safetensors", preset=preset, clip=clip, init="reference-pq", progress=False)
    with pytest.raises(InputError, match="need at least"):
        _train(path, tmp_path / "p.safetensors", preset=preset, clip=clip, progress=False)
