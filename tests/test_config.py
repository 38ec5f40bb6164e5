"""Presets are data: every shipped preset loads; bad names and keys get helpful errors."""

from __future__ import annotations

import pytest

from grefine_curate.curate.config import available_presets, load_override_file, load_preset
from grefine_curate.curate.errors import ConfigError


def test_shipped_presets_load():
    names = available_presets()
    assert {"sdxl", "sd15", "tiny"} <= set(names)
    for name in names:
        preset = load_preset(name)
        assert preset.name == name
        assert len(preset.pq.alphas) == 3


def test_default_preset_follows_the_paper():
    p = load_preset("sdxl")
    assert p.clip.model == "ViT-B-16-quickgelu" and p.clip.pretrained == "openai"
    assert p.clip.surgery_blocks == 6
    assert p.pq.alpha_mode == "per-factor" and p.pq.feature_norm == "channel"
    assert p.refiner.inpaint_model == "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="Did you mean 'sdxl'"):
        load_preset("sdx")


def test_unknown_key_named():
    with pytest.raises(ConfigError, match="surgery_block"):
        load_preset("tiny", {"clip": {"surgery_block": 3}})


def test_override_changes_hash(tmp_path):
    base = load_preset("tiny")
    f = tmp_path / "c.toml"
    f.write_text("[routing]\nskip_p = 0.9\n")
    over = load_preset("tiny", load_override_file(f))
    assert over.routing.skip_p == 0.9
    assert over.hash() != base.hash()
    assert load_preset("tiny").hash() == base.hash()


def test_bad_toml_named(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[routing\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_override_file(f)


def test_a_typo_in_a_preset_file_names_the_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n[routing]\nskip_pp = 0.8\n')
    with pytest.raises(ConfigError) as e:
        load_preset(str(path))
    assert str(path) in str(e.value) and "'skip_p'" in str(e.value)
