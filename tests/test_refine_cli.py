"""`refine --json`: the stage-1 mask it reports is the area stage 1 inpainted (0 on a light route)."""

from __future__ import annotations

import json

import numpy as np
from cli_runner import run_cli
from PIL import Image


def _refine(image_file, tmp_path, capsys, routing: str, *extra: str) -> dict:
    cfg = tmp_path / "routing.toml"
    cfg.write_text(f"[routing]\n{routing}\n")
    code, out, err = run_cli(["refine", str(image_file), "--prompt", "a red cat", "--preset", "tiny", "--config",
                              str(cfg), "--out", str(tmp_path / "r.png"), "-q", "--json", *extra], capsys)
    assert code == 0, err
    return json.loads(out)


def test_light_route_reports_no_stage1_mask(image_file, tmp_path, capsys):
    # tiny preset: p is ignored (skip_p = light_p = 0); a >= 0 and a < 1 (random weights), so the route is light
    mask_path = tmp_path / "mask.png"
    obj = _refine(image_file, tmp_path, capsys, "skip_a = 1.0\nlight_a = 0.0", "--save-mask", str(mask_path))
    assert obj["route"] == "light" and obj["steps_run"]["stage1"] == 0
    assert obj["mask_area"] == 0.0  # stage 1 did not run: it inpainted nothing
    assert 0.0 <= obj["lq_mask_area"] <= 1.0  # the low-quality mask itself, which --save-mask writes
    saved = np.asarray(Image.open(mask_path)) > 127
    assert abs(saved.mean() - obj["lq_mask_area"]) < 1e-6


def test_full_route_reports_the_inpainted_area(image_file, tmp_path, capsys):
    obj = _refine(image_file, tmp_path, capsys, "skip_a = 1.0\nlight_a = 1.0")  # every a < 1: full
    assert obj["steps_run"]["stage1"] > 0, obj  # this fixed image has a non-empty low-quality mask
    assert obj["route"] in ("full", "reverted")
    assert obj["mask_area"] == obj["lq_mask_area"] > 0.0


def test_skip_route_reports_no_stage1_mask(image_file, tmp_path, capsys):
    obj = _refine(image_file, tmp_path, capsys, "skip_a = 0.0\nlight_a = 0.0")
    assert obj["route"] == "skip" and obj["mask_area"] == 0.0
