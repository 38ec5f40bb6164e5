"""CLIP-Surgery image encoder (Li et al., 2023, arXiv:2304.05653) over open_clip's VisionTransformer.

G-Refine's PQ-Map and AQ-Map (paper eq. 1) read per-patch CLIP features from a "v-v attention"
path that runs beside the normal one over the last N residual blocks:

    x_ori: the normal block (attention softmax(q k^T s) v + MLP)
    x:     adds only the v-v attention output softmax(v v^T s) v, no MLP

Both attentions read ln_1(x_ori) and share in_proj/out_proj. After the last block the CLS token
of ``x`` is replaced by the CLS token of ``x_ori`` (so the CLS output equals open_clip's own image
embedding), then ln_post and the projection are applied to every token: (B, 1+HW, D).

Other input sizes interpolate the positional embedding on the fly (bilinear over the patch grid);
the model's parameters are never modified.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


class SurgeryEncoder(nn.Module):
    """Wraps ``clip.visual`` (a CLS-token open_clip VisionTransformer); owns no parameters of its own."""

    def __init__(self, visual: nn.Module, surgery_blocks: int = 6):
        super().__init__()
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ValueError("CLIP-Surgery needs a ViT that pools with its CLS token (pool_type='tok', no attn_pool)")
        if getattr(visual, "final_ln_after_pool", False):
            raise ValueError("CLIP-Surgery needs ln_post applied to all tokens (final_ln_after_pool=False)")
        n_blocks = len(visual.transformer.resblocks)
        if not 0 <= surgery_blocks <= n_blocks:
            raise ValueError(f"surgery_blocks={surgery_blocks} outside 0..{n_blocks} for this ViT")
        self.visual = visual
        self.surgery_blocks = surgery_blocks

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.visual.grid_size)

    def _pos_embed(self, gh: int, gw: int, dtype: torch.dtype) -> torch.Tensor:
        pos = self.visual.positional_embedding  # (1+N, W)
        n = int(round((pos.shape[0] - 1) ** 0.5))
        if (gh, gw) == (n, n):
            return pos.to(dtype)
        cls_pos, patch_pos = pos[:1], pos[1:]
        patch_pos = patch_pos.reshape(1, n, n, -1).permute(0, 3, 1, 2).float()  # (1, W, n, n)
        patch_pos = F.interpolate(patch_pos, size=(gh, gw), mode="bilinear", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(gh * gw, -1)
        return torch.cat([cls_pos.float(), patch_pos], dim=0).to(dtype)  # new tensor, parameter untouched

    def _embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        v = self.visual
        x = v.conv1(pixels)  # (B, W, gh, gw)
        b, w, gh, gw = x.shape
        x = x.reshape(b, w, gh * gw).permute(0, 2, 1)  # (B, HW, W)
        cls = v.class_embedding.to(x.dtype).reshape(1, 1, w).expand(b, 1, w)
        x = torch.cat([cls, x], dim=1) + self._pos_embed(gh, gw, x.dtype)  # (B, 1+HW, W)
        x = v.patch_dropout(x)
        return v.ln_pre(x), (gh, gw)

    @staticmethod
    def _dual_attention(blk: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Original (q-k) and v-v attention outputs of one block for input h = ln_1(x_ori)."""
        attn = blk.attn  # nn.MultiheadAttention(batch_first=True)
        b, length, d = h.shape
        heads = attn.num_heads
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # (B, L, 3D)
        q, k, v = qkv.reshape(b, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, hd)
        ori = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T s) v, s = hd^-0.5
        vv = F.scaled_dot_product_attention(v, v, v)  # softmax(v v^T s) v
        ori = ori.transpose(1, 2).reshape(b, length, d)
        vv = vv.transpose(1, 2).reshape(b, length, d)
        return attn.out_proj(ori), attn.out_proj(vv)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W), CLIP-normalised -> tokens (B, 1+HW, D) after ln_post and proj."""
        v = self.visual
        x, _ = self._embed(pixels)
        blocks = list(v.transformer.resblocks)
        first_surgery = len(blocks) - self.surgery_blocks
        batch_first = getattr(v.transformer, "batch_first", True)
        for blk in blocks[:first_surgery]:
            x = blk(x) if batch_first else blk(x.transpose(0, 1)).transpose(0, 1)
        x_ori = x
        for blk in blocks[first_surgery:]:
            ori_out, vv_out = self._dual_attention(blk, blk.ln_1(x_ori))
            x = x + vv_out  # surgery path: v-v attention only, no MLP (x == x_ori at the first block)
            x_ori = x_ori + blk.ls_1(ori_out)
            x_ori = x_ori + blk.ls_2(blk.mlp(blk.ln_2(x_ori)))
        x = torch.cat([x_ori[:, :1], x[:, 1:]], dim=1)  # CLS from the original path
        x = v.ln_post(x)
        if v.proj is not None:
            x = x @ v.proj  # (B, 1+HW, D)
        return x


def preprocess_images(
    images: Sequence[Image.Image],
    size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Bicubic resize of each whole RGB image to ``size`` (no centre crop), CLIP mean/std -> (B, 3, H, W)."""
    h, w = (size, size) if isinstance(size, int) else size
    # convert() returns a full-size copy even of an RGB image: only other modes pay for it
    arr = np.stack([np.asarray((img if img.mode == "RGB" else img.convert("RGB")).resize((w, h), Image.BICUBIC),
                               dtype=np.uint8) for img in images])
    t = torch.from_numpy(arr).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=t.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=t.device).view(1, 3, 1, 1)
    return ((t - m) / s).to(dtype)


def map_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(H, W) of an image's maps: the image's own size, or reduced (aspect kept) to a long side of
    ``max_side`` when it is longer (0 = always the image's size).

    Why: a map is interpolated from a patch grid of 14x14 (ViT-B/16 at 224), so a full-size float32
    map of a 64 MP image (256 MB, one per unmatched phrase) holds no more than its 1024-side
    reduction; the refiner only ever reads masks at its own processing size (1024 or less).
    """
    h, w = int(height), int(width)
    if max_side <= 0 or max(h, w) <= max_side:
        return h, w
    scale = max_side / max(h, w)
    if h >= w:
        return max_side, max(1, round(w * scale))  # the long side is exactly max_side
    return max(1, round(h * scale)), max_side


# A map whose raw values span less than this carries no spatial information: min-max would blow
# float noise up to [0, 1] (or, for an exactly constant map, divide by zero). It is the float16
# noise floor of a CLIP similarity (unit features, |cos| <= 1), well below any real map's range.
FLAT_RANGE = 1e-4


def tokens_to_maps(
    column: torch.Tensor,
    grid: tuple[int, int],
    sizes: Sequence[tuple[int, int]],
    mode: str = "bicubic",
    flat_fill: Sequence[float] | None = None,
    orientation: str = "hw",
) -> list[np.ndarray]:
    """Per-patch values (B, HW) -> min-max normalised (H, W) float32 maps in [0, 1], one per image.

    ``sizes`` are (H, W) per image: the map is reshaped to the patch grid (rows = image rows) and
    interpolated to (H, W), so non-square images keep their orientation. Images that share a size
    are resized in one ``interpolate`` call (a curation batch usually has one size; per-image calls
    dominated the map overhead at 512x512).

    A flat map (raw range < ``FLAT_RANGE``) is not min-max normalised: it becomes the constant
    ``flat_fill[i]`` (the caller passes the image-level score the map refines, so "no spatial
    evidence" reads as "as good as the score says", never as "all bad"); 0.5 when not given.
    ``orientation="reference-swap"`` reproduces the reference code's resize to (W, H), transposed
    back to an (H, W) array as a user of its output does (non-square images get transposed maps).
    """
    if orientation not in ("hw", "reference-swap"):
        raise ValueError(f"map orientation {orientation!r} is not one of hw, reference-swap")
    gh, gw = grid
    col = column.float().reshape(column.shape[0], 1, gh, gw)  # (B, 1, gh, gw)
    lo = col.amin(dim=(2, 3), keepdim=True)
    hi = col.amax(dim=(2, 3), keepdim=True)
    flat = (hi - lo) < FLAT_RANGE  # (B, 1, 1, 1)
    fill = torch.full_like(lo, 0.5) if flat_fill is None else torch.tensor(
        [float(v) for v in flat_fill], dtype=col.dtype, device=col.device).reshape(-1, 1, 1, 1)
    col = torch.where(flat, fill.clamp(0.0, 1.0).expand_as(col), (col - lo) / (hi - lo).clamp_min(1e-12))
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out: list[np.ndarray | None] = [None] * len(sizes)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(sizes):
        groups.setdefault((int(h), int(w)), []).append(i)
    for (h, w), idx in groups.items():
        sel = col[idx] if len(idx) < col.shape[0] else col
        target = (h, w) if orientation == "hw" else (w, h)
        m = F.interpolate(sel, size=target, mode=mode, **kwargs).clamp_(0.0, 1.0)  # (n, 1, H, W)
        if orientation == "reference-swap":
            m = m.transpose(2, 3)
        m = m[:, 0].cpu().numpy().astype(np.float32)
        for j, i in enumerate(idx):
            out[i] = np.ascontiguousarray(m[j])
    return out  # type: ignore[return-value]
