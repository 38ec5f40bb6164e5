"""The command line through its real entry point (`main`): output formats, files written, exit codes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from cli_runner import run_cli
from PIL import Image


def test_version(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.startswith("grefine-curate ")


@pytest.mark.parametrize("cmd", ["run", "score", "pq", "aq", "score-image", "parse", "refine", "train-pq",
                                 "eval", "report", "models", "prompts"])
def test_every_command_has_help(cmd, capsys):
    code, out, _ = run_cli([cmd, "--help"], capsys)
    assert code == 0 and "Usage" in out


def test_pq_json_and_map(image_file, tmp_path, capsys):
    map_path = tmp_path / "map.png"
    code, out, err = run_cli(["pq", str(image_file), "--preset", "tiny", "--json", "--save-map", str(map_path)], capsys)
    assert code == 0, err
    obj = json.loads(out)
    assert set(obj["factors"]) == {"overall", "technical", "rationality", "naturalness"}
    assert 0.0 <= obj["p"] <= 1.0
    saved = Image.open(map_path)
    assert saved.mode == "L" and saved.size == (80, 48)  # the image's own (W, H)
    assert "no quality meaning" in err


def test_aq_and_score_image_json(image_file, tmp_path, capsys):
    map_path = tmp_path / "aq.png"
    code, out, err = run_cli(["aq", str(image_file), "--prompt", "a red cat on a blue sofa", "--preset", "tiny",
                              "--json", "--save-map", str(map_path)], capsys)
    assert code == 0, err
    obj = json.loads(out)
    assert 0.0 <= obj["a"] <= 1.0 and [p["noun"] for p in obj["phrases"]] == ["cat", "sofa"]
    assert Image.open(map_path).size == (80, 48)
    code, out, err = run_cli(["score-image", str(image_file), "--prompt", "a red cat", "--preset", "tiny", "--json"], capsys)
    assert code == 0, err
    obj = json.loads(out)
    assert obj["route"] in ("skip", "light", "full") and obj["aq"]["phrases"][0]["noun"] == "cat"
    code, out, err = run_cli(["score-image", str(image_file), "--preset", "tiny", "--json"], capsys)
    assert code == 0 and json.loads(out)["aq"] is None


def test_parse_json(capsys):
    code, out, _ = run_cli(["parse", "a dog on a mat", "", "--json"], capsys)
    assert code == 0
    obj = json.loads(out)
    assert len(obj) == 2 and obj[1]["phrases"] == []
    assert [p["noun"] for p in obj[0]["phrases"]] == ["dog", "mat"]
    assert all(p["parent"] in range(len(obj[0]["phrases"])) for p in obj[0]["phrases"])


def test_parse_human(capsys):
    code, out, _ = run_cli(["parse", "(masterpiece:1.2), a cat"], capsys)
    assert code == 0 and "cat" in out and "cleaned" in out


def test_maps_and_masks_are_written_at_the_images_size_when_computed_smaller(image_file, tmp_path, capsys):
    """Maps are computed at most map_max_side long (issue 15, memory); --save-map and --save-mask
    still write files of the image's own size, the mask black and white."""
    cfg = tmp_path / "small-maps.toml"
    cfg.write_text("map_max_side = 20\n[routing]\nskip_a = 1.0\nlight_a = 1.0\n")
    for cmd, extra in (("pq", []), ("aq", ["--prompt", "a red cat on a blue sofa"])):
        code, out, err = run_cli([cmd, str(image_file), "--preset", "tiny", "--config", str(cfg), "--json",
                                  "--save-map", str(tmp_path / f"{cmd}.png"), *extra], capsys)
        assert code == 0, err
        assert Image.open(tmp_path / f"{cmd}.png").size == (80, 48)
    assert json.loads(out)["map_size"] == [12, 20]  # aq --json: the size it was computed at
    code, out, err = run_cli(["refine", str(image_file), "--prompt", "a red cat", "--preset", "tiny", "--config",
                              str(cfg), "--out", str(tmp_path / "r.png"), "--save-mask", str(tmp_path / "m.png"),
                              "--json"], capsys)
    assert code == 0, err
    mask = Image.open(tmp_path / "m.png")
    assert mask.size == (80, 48) and set(np.unique(np.asarray(mask))) <= {0, 255}


def test_refine_writes_original_size(image_file, tmp_path, capsys):
    out_path = tmp_path / "refined.png"
    mask_path = tmp_path / "mask.png"
    code, out, err = run_cli(["refine", str(image_file), "--prompt", "a red cat", "--preset", "tiny", "--out", str(out_path),
                              "--seed", "3", "--save-mask", str(mask_path), "--json"], capsys)
    assert code == 0, err
    obj = json.loads(out)
    assert obj["route"] in ("skip", "light", "full", "reverted")
    assert Image.open(out_path).size == (80, 48)
    assert 0.0 <= obj["mask_area"] <= 1.0


def test_bad_inputs_exit_2_and_name_it(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    code, _, err = run_cli(["pq", str(bad), "--preset", "tiny"], capsys)
    assert code == 2 and "notes.txt" in err
    code, _, err = run_cli(["pq", str(tmp_path / "missing.png"), "--preset", "tiny"], capsys)
    assert code == 2 and "missing.png" in err
    code, _, err = run_cli(["pq", str(bad), "--preset", "sdxx"], capsys)
    assert code == 2 and "sdxl" in err
    code, _, err = run_cli(["run", str(tmp_path), "--out", str(tmp_path / "o"), "--mode", "fast"], capsys)
    assert code == 2


def test_missing_weights_exit_1(image_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(["pq", str(image_file), "--models-dir", str(tmp_path)], capsys)
    assert code == 1 and "ViT-B-16-quickgelu" in err and "models pull" in err


# --------------------------------------------------------------------------------------------- #
# Job, evaluation and training commands through the CLI


@pytest.fixture(scope="module")
def mos_parquet(tmp_path_factory):
    """24 images whose 'mos' falls with blur (the tiny model's scores mean nothing; the plumbing is tested)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import ImageFilter

    rng = np.random.default_rng(1)
    rows = {"image": [], "prompt": [], "mos": [], "align": []}
    for i in range(24):
        img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(i % 6))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        rows["image"].append(buf.getvalue())
        rows["prompt"].append(["a red cat", "a blue car on a road", "two dogs in snow"][i % 3])
        rows["mos"].append(5.0 - (i % 6) * 0.7)
        rows["align"].append(float(i % 5))
    path = tmp_path_factory.mktemp("mos") / "mos.parquet"
    pq.write_table(pa.table(rows), path)
    return path


def test_run_and_score_commands(tmp_path, capsys):
    from job_corpus import write_dataset

    write_dataset(str(tmp_path / "in"), shards=1, rows=3)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["run", str(tmp_path / "in"), "--out", str(out), "--preset", "tiny", "--executor", "local",
                                 "--quiet", "--save-maps"], capsys)
    assert code == 0, err
    assert "done: 3 rows" in stdout and (out / "__grefine__" / "report.html").exists() and (out / "__grefine__" / "manifest.json").exists()
    code, stdout, err = run_cli(["run", str(tmp_path / "in"), "--out", str(out), "--preset", "tiny", "--executor", "local",
                                 "--quiet", "--save-maps"], capsys)  # same command again: resumed, nothing recomputed
    assert code == 0 and "0 run now, 1 already complete" in stdout
    code, _, err = run_cli(["run", str(tmp_path / "in"), "--out", str(out), "--preset", "tiny", "--executor", "local",
                            "--quiet", "--save-maps", "--batch-size", "2"], capsys)
    assert code == 0  # batch size does not change results: no refusal
    code, _, err = run_cli(["score", str(tmp_path / "in"), "--out", str(out), "--preset", "tiny", "--executor", "local",
                            "--quiet"], capsys)
    assert code == 2 and "--force" in err  # a config change against OUT's manifest is refused
    code, stdout, err = run_cli(["score", str(tmp_path / "in"), "--out", str(tmp_path / "audit"), "--preset", "tiny",
                                 "--executor", "local", "--quiet"], capsys)
    assert code == 0, err
    code, stdout, err = run_cli(["report", str(tmp_path / "audit")], capsys)
    assert code == 0 and "report.html" in stdout


def test_eval_command_json(mos_parquet, capsys):
    code, out, err = run_cli(["eval", str(mos_parquet), "--mos-column", "mos", "--align-mos-column", "align",
                              "--preset", "tiny", "--bootstrap", "50", "--quiet", "--json"], capsys)
    assert code == 0, err
    obj = json.loads(out)
    for key in ("srcc", "plcc"):
        assert -1.0 <= obj["scores"]["p"][key] <= 1.0 and -1.0 <= obj["scores"]["a"][key] <= 1.0
    code, _, err = run_cli(["eval", str(mos_parquet), "--mos-column", "dmos", "--preset", "tiny", "--quiet"], capsys)
    assert code == 2 and "dmos" in err and "mos" in err


def test_train_pq_and_prompts_import(mos_parquet, tmp_path, capsys):
    from grefine_curate.curate.prompts import LearnedPrompts

    out = tmp_path / "p.safetensors"
    code, stdout, err = run_cli(["train-pq", str(mos_parquet), "--out", str(out), "--preset", "tiny", "--epochs", "2",
                                 "--quiet", "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["n_train"] + json.loads(stdout)["n_val"] == 24
    assert LearnedPrompts.load(out).ctx["overall"].shape[-1] == 32  # the tiny text width
    code, stdout, err = run_cli(["pq", str(tmp_path / "missing.png"), "--preset", "tiny", "--prompts", str(out)], capsys)
    assert code == 2
    # run and score take --prompts like pq and eval (issue 16)
    code, stdout, err = run_cli(["score", str(mos_parquet), "--out", str(tmp_path / "audit"), "--preset", "tiny",
                                 "--executor", "local", "--limit", "2", "-q", "--prompts", str(out)], capsys)
    assert code == 0, err
    man = json.loads((tmp_path / "audit" / "__grefine__" / "manifest.json").read_text())
    assert man["result_config"]["preset"]["pq"]["prompts"] == str(out)
    imported = tmp_path / "released.safetensors"
    from pathlib import Path

    released = Path(__file__).parent / "data" / "reference-prompts"
    code, stdout, err = run_cli(["prompts", "import", str(released), "--out", str(imported)], capsys)
    assert code == 0, err
    assert LearnedPrompts.load(imported).ctx["overall"].shape == (2, 16, 512)


def test_models_list_has_header(capsys):
    code, out, _ = run_cli(["models", "list"], capsys)
    assert code == 0 and out.splitlines()[0].split() == ["preset", "component", "model", "present"]
    assert "diffusers/stable-diffusion-xl-1.0-inpainting-0.1" in out


# --------------------------------------------------------------------------------------------- #
# First-run bugs (issue #11)


def test_refine_out_is_encoded_by_its_extension_or_refused(image_file, tmp_path, capsys):
    out = tmp_path / "refined.jpg"
    code, _, err = run_cli(["refine", str(image_file), "--prompt", "a red cat", "--preset", "tiny", "--out", str(out),
                            "-q"], capsys)
    assert code == 0, err
    assert Image.open(out).format == "JPEG" and err == ""  # -q: no tiny-preset note
    for bad in ("refined.gif", "refined"):
        code, _, err = run_cli(["refine", str(image_file), "--prompt", "a red cat", "--preset", "tiny",
                                "--out", str(tmp_path / bad)], capsys)
        assert code == 2 and bad in err and ".png" in err and not (tmp_path / bad).exists()


def test_refine_json_reports_the_scores_after_a_skip(image_file, tmp_path, capsys):
    cfg = tmp_path / "skip.toml"
    cfg.write_text("[routing]\nskip_a = 0.0\nlight_a = 0.0\n")  # tiny preset: p ignored, so every image skips
    code, out, err = run_cli(["refine", str(image_file), "--prompt", "a red cat", "--preset", "tiny", "--config",
                              str(cfg), "--out", str(tmp_path / "r.png"), "--json"], capsys)
    assert code == 0, err
    obj = json.loads(out)
    assert obj["route"] == "skip" and obj["p_after"] == obj["p"] and obj["a_after"] == obj["a"]
    code, out, _ = run_cli(["refine", str(image_file), "--prompt", "a red cat", "--preset", "tiny", "--config",
                            str(cfg), "--out", str(tmp_path / "r.png")], capsys)
    assert f"p {obj['p']:.4f} -> {obj['p']:.4f}" in out  # the text and the JSON say the same


@pytest.mark.parametrize("cmd", ["run", "score", "eval", "train-pq", "refine"])
def test_help_has_quiet_and_no_type_placeholders(cmd, capsys):
    code, out, _ = run_cli([cmd, "--help"], capsys)
    assert code == 0 and "-q" in out
    assert "<bool>" not in out and "<list[str]>" not in out
    if cmd in ("run", "score"):
        assert "Resume even though" not in out and "recompute" in " ".join(out.split())


def test_a_typo_in_a_config_file_names_the_file(image_file, tmp_path, capsys):
    cfg = tmp_path / "mine.toml"
    cfg.write_text("[aq]\nbetta = 0.3\n")
    code, _, err = run_cli(["pq", str(image_file), "--preset", "tiny", "--config", str(cfg)], capsys)
    assert code == 2 and str(cfg) in err and "'betta'" in err and "'beta'" in err


def test_train_pq_suggests_its_own_options(mos_parquet, tmp_path, capsys):
    code, _, err = run_cli(["train-pq", str(mos_parquet), "--out", str(tmp_path / "p.safetensors"), "--preset", "tiny",
                            "--mos", "overall=dmos", "-q"], capsys)
    assert code == 2 and "dmos" in err and "--mos FACTOR=COLUMN" in err and "--mos-column" not in err


def test_maps_and_masks_are_encoded_by_their_extension_or_refused(image_file, tmp_path, capsys):
    code, _, err = run_cli(["pq", str(image_file), "--preset", "tiny", "--save-map", str(tmp_path / "p.jpg")], capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "p.jpg").format == "JPEG" and Image.open(tmp_path / "p.jpg").size == (80, 48)
    code, _, err = run_cli(["aq", str(image_file), "--prompt", "a cat", "--preset", "tiny",
                            "--save-map", str(tmp_path / "a.tga")], capsys)
    assert code == 2 and "a.tga" in err and ".png" in err
    code, _, err = run_cli(["refine", str(image_file), "--prompt", "a cat", "--preset", "tiny", "--out",
                            str(tmp_path / "r.png"), "--save-mask", str(tmp_path / "m.bmp")], capsys)
    assert code == 2 and "m.bmp" in err and not (tmp_path / "r.png").exists()
