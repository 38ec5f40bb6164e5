"""CLIP-Surgery encoder: CLS equals open_clip's image embedding, v-v path math, shapes, frozen parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grefine_curate.curate.clip_models import build_tiny_clip
from grefine_curate.curate.surgery import SurgeryEncoder


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_clip(seed=0).eval()


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(0)
    return torch.randn(2, 3, 224, 224)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _reference_surgery(visual, pixels, n_surgery):
    """The v-v path written out with explicit matmuls (REFERENCE.md section 1), for comparison."""
    x = visual.conv1(pixels)
    b, w, gh, gw = x.shape
    x = x.reshape(b, w, -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.reshape(1, 1, w).expand(b, 1, w), x], 1) + visual.positional_embedding
    x = visual.ln_pre(x)
    blocks = list(visual.transformer.resblocks)
    for blk in blocks[: len(blocks) - n_surgery]:
        x = blk(x)
    x_ori = x
    for blk in blocks[len(blocks) - n_surgery :]:
        attn = blk.attn
        h = blk.ln_1(x_ori)
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        heads, hd = attn.num_heads, w // attn.num_heads

        def split(t):
            return t.reshape(b, -1, heads, hd).transpose(1, 2)  # (B, h, L, hd)

        q, k, v = split(q), split(k), split(v)
        s = hd**-0.5
        ori = (torch.softmax(q @ k.transpose(-1, -2) * s, -1) @ v).transpose(1, 2).reshape(b, -1, w)
        vv = (torch.softmax(v @ v.transpose(-1, -2) * s, -1) @ v).transpose(1, 2).reshape(b, -1, w)
        x = x + attn.out_proj(vv)
        x_ori = x_ori + blk.ls_1(attn.out_proj(ori))
        x_ori = x_ori + blk.ls_2(blk.mlp(blk.ln_2(x_ori)))
    x = torch.cat([x_ori[:, :1], x[:, 1:]], 1)
    return visual.ln_post(x) @ visual.proj


@torch.no_grad()
@pytest.mark.parametrize("n_surgery", [0, 2, 4])
def test_cls_equals_open_clip_image_embedding(tiny, pixels, n_surgery):
    tokens = SurgeryEncoder(tiny.visual, n_surgery)(pixels)
    expected = tiny.encode_image(pixels)  # (B, D), open_clip's own forward
    torch.testing.assert_close(tokens[:, 0], expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_surgery_path_matches_explicit_vv_attention(tiny, pixels):
    tokens = SurgeryEncoder(tiny.visual, 2)(pixels)
    torch.testing.assert_close(tokens, _reference_surgery(tiny.visual, pixels, 2), atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_surgery_changes_patch_tokens_not_cls(tiny, pixels):
    plain = SurgeryEncoder(tiny.visual, 0)(pixels)
    surg = SurgeryEncoder(tiny.visual, 2)(pixels)
    torch.testing.assert_close(plain[:, 0], surg[:, 0], atol=1e-5, rtol=1e-5)
    assert (plain[:, 1:] - surg[:, 1:]).abs().max() > 1e-2, "surgery blocks did not change the patch tokens"


@torch.no_grad()
def test_token_shapes_and_other_sizes_leave_parameters_unchanged(tiny, pixels):
    enc = SurgeryEncoder(tiny.visual, 2)
    before = _state(tiny)
    out_224 = enc(pixels)
    assert out_224.shape == (2, 1 + 14 * 14, 32)
    assert enc.grid == (14, 14)
    out_other = enc(torch.randn(2, 3, 160, 320))  # another size and aspect: 10 x 20 patches
    assert out_other.shape == (2, 1 + 10 * 20, 32)
    after = _state(tiny)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"parameter {k} changed by a run at another size"
    assert tiny.visual.positional_embedding.shape == (1 + 14 * 14, 64)
    torch.testing.assert_close(enc(pixels), out_224, atol=0, rtol=0)  # nothing cached from the other size


def test_encoder_owns_no_parameters_and_rejects_bad_block_counts(tiny):
    enc = SurgeryEncoder(tiny.visual, 4)
    assert sum(p.numel() for n, p in enc.named_parameters() if not n.startswith("visual.")) == 0
    with pytest.raises(ValueError, match="surgery_blocks"):
        SurgeryEncoder(tiny.visual, 5)


@torch.no_grad()
def test_vit_b16_architecture_cls_equals_encode_image():
    """The real ViT-B/16 layout (12 blocks, QuickGELU, width 768), random weights, surgery on the last 6."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    x = torch.randn(1, 3, 224, 224)
    tokens = SurgeryEncoder(model.visual, 6)(x)
    assert tokens.shape == (1, 197, 512)
    torch.testing.assert_close(tokens[:, 0], model.encode_image(x), atol=1e-4, rtol=1e-4)


def test_map_size_keeps_the_aspect_and_caps_the_long_side():
    from grefine_curate.curate.surgery import map_size

    assert map_size(6000, 8000, 1024) == (768, 1024)
    assert map_size(8000, 6000, 1024) == (1024, 768)
    assert map_size(8192, 8192, 1024) == (1024, 1024)
    assert map_size(10, 20000, 1024) == (1, 1024)  # never a zero side
    assert map_size(600, 800, 1024) == (600, 800)  # smaller images keep their size
    assert map_size(6000, 8000, 0) == (6000, 8000)  # 0: the image's own size
