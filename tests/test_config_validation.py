"""Every config value is checked when the preset is resolved (issue 15 item 10): one line naming the
file, the table and the key, a ConfigError (exit 2); and a relative clip.checkpoint in a --config
TOML is read from the TOML's folder (issue 16 item 4)."""

from __future__ import annotations

import sys

import pytest

from grefine_curate.curate.config import available_presets, load_preset, resolve_preset
from grefine_curate.curate.errors import ConfigError


def config_error(tmp_path, toml: str, name: str = "c.toml") -> str:
    path = tmp_path / name
    path.write_text(toml)
    with pytest.raises(ConfigError) as e:
        resolve_preset("tiny", config_file=path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg  # one line that names the file
    return msg


@pytest.mark.parametrize("toml, says", [
    ("[refiner]\nsteps = -5\n", "[refiner] steps must be an integer in [1, 1000], got -5"),
    ("[refiner]\nsteps = 0\n", "[refiner] steps must be an integer in [1, 1000], got 0"),
    ('[refiner]\nsteps = "ten"\n', "[refiner] steps must be an integer in [1, 1000], got 'ten'"),
    ("[refiner]\nsteps = 1e11\n", "[refiner] steps must be an integer in [1, 1000], got 100000000000.0"),
    ("[refiner]\nsteps = 100000000000\n", "[refiner] steps must be an integer in [1, 1000]"),
    ("[aq]\nmax_phrases = -3\n", "[aq] max_phrases must be an integer in [0, 4096], got -3"),
    ('[aq]\ntemplates = "imagenett"\n', "[aq] templates must be one of imagenet, single Did you mean 'imagenet'?"),
    ('[aq]\ntemplates = ["no placeholder"]\n', "[aq] templates must be one of imagenet, single or a non-empty list"),
    ("[aq]\ntemplates = 3\n", "[aq] templates must be"),
    ('seed = "abc"\n', "seed must be an integer in [0, 9223372036854775807], got 'abc'"),
    ("seed = -1\n", "seed must be an integer"),
    ("[refiner]\nguard_tolerance = nan\n", "[refiner] guard_tolerance must be a finite number in [0, 1], got nan"),
    ("[refiner]\nguard = 2\n", "[refiner] guard must be true or false, got 2"),
    ("max_pixels = -1\n", "max_pixels must be an integer in [1, 1099511627776], got -1"),
    ("[refiner.mask]\ndilate = -2\n", "[refiner.mask] dilate must be an integer in [0, 1024], got -2"),
    ('[refiner.mask]\nmode = "papr"\n', "[refiner.mask] mode must be one of paper, reference-union Did you mean 'paper'"),
    ("[refiner]\nresolution = 1001\n", "[refiner] resolution must be a multiple of 8, got 1001"),
    ("[routing]\nskip_p = inf\n", "[routing] skip_p must be a finite number in [0, 1], got inf"),
    ("[routing]\nskip_p = 1.5\n", "[routing] skip_p must be a number in [0, 1], got 1.5"),
    ("[pq]\nalphas = [0.9, 0.5]\n", "[pq] alphas must be a list of 3 numbers"),
    ("[pq]\nalphas = [0.9, 0.5, nan]\n", "[pq] alphas must be a list of finite numbers"),
    ('[pq]\nzero_shot = {sharpness = ["a", "b"]}\n', "[pq] zero_shot has an unknown factor 'sharpness'"),
    ("[pq]\ncask = 1\n", "[pq] cask must be true or false, got 1"),
    ('[clip]\ndtype = "half"\n', "[clip] dtype must be one of auto, float32, float16, bfloat16"),
    ("[clip]\nimage_size = 224.0\n", "[clip] image_size must be an integer"),
    ("refiner = 3\n", "[refiner] must be a table, got 3"),
    ("[refiner]\nsteps = {a = 1}\n", "[refiner] steps must be an integer in [1, 1000], got a table"),
    ('[aq]\nmodifiers = "strp"\n', "[aq] modifiers must be one of strip, keep Did you mean 'strip'"),
    ('[aq]\nnoun = "last"\n', "[aq] noun must be one of chunk-head, last-noun"),
    ('[aq]\nparents = "words"\n', "[aq] parents must be one of position, word-text"),
])
def test_a_bad_value_is_one_line_naming_the_file_table_and_key(tmp_path, toml, says):
    assert says in config_error(tmp_path, toml)


def test_checks_across_fields_name_the_preset_and_the_file(tmp_path):
    msg = config_error(tmp_path, "[refiner]\nstrength_min = 0.9\nstrength_max = 0.4\n")
    assert "preset 'tiny' with config file" in msg
    assert "[refiner] strength_min must be <= strength_max, got strength_min=0.9, strength_max=0.4" in msg
    msg = config_error(tmp_path, "[refiner]\nstrength_min = 0.9\n")  # against the preset's strength_max
    assert "[refiner] strength_min must be <= strength_max" in msg
    msg = config_error(tmp_path, "[routing]\nlight_a = 0.9\n")
    assert "[routing] thresholds out of order" in msg


def test_a_toml_nested_thousands_deep_is_one_line_not_a_recursion_error(tmp_path):
    for toml in ("seed = " + "[" * 5000 + "]" * 5000 + "\n", "seed = " + "{a = " * 5000 + "1" + "}" * 5000 + "\n"):
        assert "nested too deeply" in config_error(tmp_path, toml)
    dotted = "[" + ".".join(["refiner"] * 5000) + "]\nx = 1\n"  # a 5000-deep table: tomllib reads it
    assert "[refiner] unknown key 'refiner'" in config_error(tmp_path, dotted)
    limit = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(400)  # the checks themselves never recurse with the depth of the file
        assert "[refiner] unknown key" in config_error(tmp_path, dotted)
    finally:
        sys.setrecursionlimit(limit)


def test_a_preset_file_and_programmatic_overrides_are_checked_too(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n[refiner]\nsteps = -5\n')
    with pytest.raises(ConfigError, match=r"preset 'mine' \(.*mine.toml\): \[refiner\] steps must be an integer"):
        load_preset(str(path))
    with pytest.raises(ConfigError, match=r"^overrides: \[aq\] beta must be a finite number"):
        resolve_preset("tiny", overrides={"aq": {"beta": float("nan")}})
    with pytest.raises(ConfigError, match=r"config file .*: \[refiner\] guard must be true or false"):
        path.write_text("[refiner]\nguard = 2\n")
        resolve_preset("tiny", config_file=path)
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"seed = \xff\n")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        resolve_preset("tiny", config_file=bad)


def test_shipped_presets_and_good_values_pass(tmp_path):
    for name in available_presets():
        load_preset(name)
    path = tmp_path / "ok.toml"
    path.write_text('seed = 7\n[aq]\ntemplates = ["a photo of a {}.", "art of a {}."]\n[refiner]\nsteps = 8\n'
                    "guard = false\nguard_tolerance = 0\n[refiner.mask]\ndilate = 0\n")
    p = resolve_preset("tiny", config_file=path, overrides={"clip": {"pretrained": "", "checkpoint": None}})
    assert p.seed == 7 and p.refiner.steps == 8 and p.aq.templates == ("a photo of a {}.", "art of a {}.")


def test_a_relative_checkpoint_is_read_from_the_config_files_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "c.toml").write_text('[clip]\ncheckpoint = "weights/clip.pt"\n')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    p = resolve_preset("tiny", config_file=str(folder / "c.toml"))
    assert p.clip.checkpoint == str(folder / "weights" / "clip.pt")
    (folder / "abs.toml").write_text(f'[clip]\ncheckpoint = "{tmp_path / "x.pt"}"\n')
    assert resolve_preset("tiny", config_file=str(folder / "abs.toml")).clip.checkpoint == str(tmp_path / "x.pt")
    (folder / "mine.toml").write_text('name = "mine"\n[clip]\ncheckpoint = "w.pt"\n')  # a preset file too
    assert load_preset(str(folder / "mine.toml")).clip.checkpoint == str(folder / "w.pt")
    assert load_preset("tiny", {"clip": {"checkpoint": "rel.pt"}}).clip.checkpoint == "rel.pt"  # code: as given


def test_cli_exit_2_and_one_line(tmp_path, capsys, monkeypatch):
    from grefine_curate.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text("[refiner]\nsteps = -5\n")
    monkeypatch.setattr(sys, "argv", ["grefine-curate", "score", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                                      "--preset", "tiny", "--config", str(cfg), "--executor", "local"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and f"config file {cfg}: [refiner] steps must be an integer in [1, 1000], got -5" in err
    assert len(err.splitlines()) == 1, err
