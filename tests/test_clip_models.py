"""CLIP loading: tiny built in code; missing pretrained weights fail fast with guidance."""

from __future__ import annotations

import time

import pytest
import torch

from grefine_curate.curate.clip_models import load_clip
from grefine_curate.curate.config import ClipConfig
from grefine_curate.curate.errors import ModelUnavailableError


def test_tiny_is_deterministic(tiny_preset):
    a = load_clip(tiny_preset.clip).model
    b = load_clip(tiny_preset.clip).model
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), na


def test_missing_pretrained_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError) as e:
        load_clip(ClipConfig(model="ViT-B-16-quickgelu", pretrained="openai"), models_dir=tmp_path)
    assert time.monotonic() - start < 10
    msg = str(e.value)
    assert "ViT-B-16-quickgelu/openai" in msg and str(tmp_path) in msg and "models pull" in msg


def test_missing_checkpoint_file_named(tmp_path):
    with pytest.raises(ModelUnavailableError, match="nope.safetensors"):
        load_clip(ClipConfig(model="ViT-B-16-quickgelu", checkpoint=str(tmp_path / "nope.safetensors")))


def test_unknown_architecture_suggests():
    with pytest.raises(ModelUnavailableError, match="ViT-B-16"):
        load_clip(ClipConfig(model="ViT-B-61", pretrained=None))


def test_local_checkpoint_round_trip(tmp_path, tiny_preset):
    """A local checkpoint path is loaded through open_clip's own loader."""
    import open_clip

    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
    path = tmp_path / "vitb16.pt"
    torch.save(model.state_dict(), path)
    bundle = load_clip(ClipConfig(model="ViT-B-16-quickgelu", pretrained=None, checkpoint=str(path),
                                  device="cpu", dtype="float32"))
    k = "visual.conv1.weight"
    assert torch.equal(bundle.model.state_dict()[k], model.state_dict()[k])
    assert bundle.name == "ViT-B-16-quickgelu/vitb16.pt"


@pytest.mark.real_weights
def test_openai_vit_b16_loads():
    bundle = load_clip(ClipConfig())
    assert bundle.name == "ViT-B-16-quickgelu/openai"


def test_unreachable_hub_fails_fast_without_offline_flag(tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE and no network: a probe of the hub decides in seconds (no minute of retries)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens, refused at once
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError) as e:
        load_clip(ClipConfig(model="ViT-B-16-quickgelu", pretrained="openai"), models_dir=tmp_path)
    assert time.monotonic() - start < 10
    assert "cannot be reached" in str(e.value)
