"""Test data for the curation-job tests, generated in code: small Parquet shards, image folders,
a bad-input corpus, and a fake engine (for processor unit tests that must not load models)."""

from __future__ import annotations

import io
import json
import os
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from grefine_curate.curate.results import AQResult, PhraseScore, PQResult, ScoreResult
from grefine_curate.curate.routing import choose_route
from grefine_curate.curate.config import RoutingConfig
from grefine_curate.pipelines.processor import RefineResponse


def rgb(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, size=(1, 1, 3))
    grad = np.linspace(0, 1, w)[None, :, None] * rng.integers(0, 200, size=(1, 1, 3))
    arr = np.clip(base * 0.5 + grad + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    return encode(rgb(seed, size), "JPEG", quality=90)


PROMPTS = ["a red car on a street", "a cat sitting on a blue sofa", "two dogs playing in the snow",
           "a bowl of fruit with a green apple", "a lighthouse at sunset"]


def write_shard(path: str, n: int, start: int = 0, prompts: bool = True, struct: bool = False,
                extra: bool = True) -> None:
    """A Parquet shard of n JPEG rows: image (binary or HF struct), prompt, a passthrough column."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    imgs = [jpeg(start + i) for i in range(n)]
    cols: dict[str, pa.Array] = {}
    if struct:
        cols["image"] = pa.array([{"bytes": b, "path": f"img{start + i}.jpg"} for i, b in enumerate(imgs)],
                                 pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        cols["image"] = pa.array(imgs, pa.binary())
    if prompts:
        cols["prompt"] = pa.array([PROMPTS[(start + i) % len(PROMPTS)] for i in range(n)], pa.string())
    if extra:
        cols["row_key"] = pa.array([start + i for i in range(n)], pa.int64())
        cols["meta"] = pa.array([{"w": 48, "src": f"s{start + i}"} for i in range(n)])
    table = pa.table(cols)
    if struct:  # what Hugging Face datasets write: their features in the schema metadata
        feats = {"image": {"_type": "Image"}, "prompt": {"dtype": "string", "_type": "Value"}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": feats}})})
    pq.write_table(table, path, row_group_size=max(1, n // 2))


def write_dataset(root: str, shards: int = 3, rows: int = 5, **kw) -> list[str]:
    paths = []
    for s in range(shards):
        sub = "part-a" if s % 2 == 0 else "part-b"
        p = os.path.join(root, sub, f"shard-{s:03d}.parquet")
        write_shard(p, rows, start=s * rows, **kw)
        paths.append(p)
    return paths


def _cmyk() -> bytes:
    return encode(rgb(7).convert("CMYK"), "JPEG")


def _gif() -> bytes:
    frames = [rgb(i).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _png16() -> bytes:
    arr = (np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 30).astype(np.uint16)
    return encode(Image.fromarray(arr).convert("I;16") if Image.fromarray(arr).mode != "I;16" else Image.fromarray(arr), "PNG")


def _big_header_png(w: int = 10000, h: int = 10000) -> bytes:
    """A valid PNG header claiming w x h pixels (a decompression-bomb stand-in; tiny on disk)."""
    import struct as st

    def chunk(t: bytes, data: bytes) -> bytes:
        return st.pack(">I", len(data)) + t + data + st.pack(">I", zlib.crc32(t + data) & 0xFFFFFFFF)

    ihdr = st.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")


def bad_corpus() -> list[tuple[str, bytes | None, str | None, str]]:
    """(name, bytes, prompt, expected status). Conversions are ok; broken bytes are errors."""
    good = jpeg(1)
    return [
        ("good-jpeg", good, "a red car on a street", "ok"),
        ("corrupt", b"\xff\xd8\xff\xe0" + os.urandom(200), "a red car", "error"),
        ("truncated", good[: len(good) // 2], "a red car", "error"),
        ("zero-length", b"", "a red car", "error"),
        ("null", None, "a red car", "error"),
        ("not-an-image", b"hello, I am a text file\n" * 10, "a red car", "error"),
        ("over-pixel-limit", _big_header_png(), "a red car", "error"),
        ("grayscale", encode(rgb(2).convert("L")), "a grey photo", "ok"),
        ("rgba", encode(rgb(3).convert("RGBA")), "a photo", "ok"),
        ("palette", encode(rgb(4).convert("P")), "a photo", "ok"),
        ("16-bit", _png16(), "a gradient", "ok"),
        ("cmyk", _cmyk(), "a photo", "ok"),
        ("animated-gif", _gif(), "an animation", "ok"),
        ("webp", encode(rgb(5), "WEBP"), "a photo", "ok"),
        ("bmp", encode(rgb(6), "BMP"), "a photo", "ok"),
        ("tiff", encode(rgb(8), "TIFF"), "a photo", "ok"),
        ("null-prompt", jpeg(9), None, "ok"),
        ("empty-prompt", jpeg(10), "   ", "ok"),
        ("long-prompt", jpeg(11), ", ".join(f"a {c} cube on a {d} table" for c, d in
                                            zip(["red", "blue", "green", "pink"] * 30, ["wooden", "glass"] * 60)), "ok"),
        ("non-english", jpeg(12), "一只猫坐在红色的沙发上, un chat très mignon", "ok"),
        ("duplicate-id", jpeg(13), "a red car on a street", "ok"),
        ("duplicate-id", jpeg(14), "a cat", "ok"),
    ]


def write_bad_shard(path: str) -> list[tuple[str, bytes | None, str | None, str]]:
    corpus = bad_corpus()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({
        "id": pa.array([c[0] for c in corpus], pa.string()),
        "image": pa.array([c[1] for c in corpus], pa.binary()),
        "prompt": pa.array([c[2] for c in corpus], pa.string()),
    }), path)
    return corpus


def write_folder(root: str, n: int = 5, sidecar: bool = True) -> list[str]:
    """An image folder with nested dirs; prompts by sidecar .txt or metadata.jsonl."""
    rels = []
    for i in range(n):
        rel = f"{'sub/' if i % 2 else ''}img_{i:02d}.{'png' if i % 3 == 0 else 'jpg'}"
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(encode(rgb(100 + i), "PNG") if rel.endswith(".png") else jpeg(100 + i))
        if sidecar:
            with open(os.path.splitext(p)[0] + ".txt", "w") as f:
                f.write(PROMPTS[i % len(PROMPTS)] + "\n")
        rels.append(rel)
    return rels


class FakeEngine:
    """Deterministic stand-in for the models: p = mean brightness, a from the prompt's length.

    ``fail_width``: images of this width make any batch containing them raise (a model failure),
    so the processor's per-item fallback can be checked.
    """

    def __init__(self, fail_width: int | None = None):
        self.fail_width = fail_width
        self.batches: list[int] = []
        self.refined: list[str] = []
        self.routing = RoutingConfig()

    def score(self, images, prompts):
        self.batches.append(len(images))
        if self.fail_width is not None and any(im.width == self.fail_width for im in images):
            raise RuntimeError("simulated model failure on this batch")
        out = []
        for im, pr in zip(images, prompts):
            arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
            pq_ = PQResult(p=float(arr.mean()), factors={"overall": float(arr.mean())}, P=arr)
            aq = None
            if pr is not None:
                a = (len(pr) % 10) / 10.0
                aq = AQResult(a=a, clip_score=a, A=1.0 - arr,
                              phrases=[PhraseScore(pr.split()[-1], pr.split()[-1], 0, a, a, "noun-unmatched" if a < 0.5 else None)])
            out.append(ScoreResult(pq=pq_, aq=aq))
        return out

    def route(self, p, a):
        return choose_route(p, a, self.routing)

    def item_seed(self, item_id):
        return zlib.crc32(item_id.encode())

    def refine(self, requests):
        outs = []
        for r in requests:
            self.refined.append(r.item_id)
            img = Image.eval(r.image, lambda v: 255 - v)
            if r.route == "light" and r.score.p < 0.3:
                outs.append(RefineResponse(image=None, route="reverted", p_after=r.score.p, a_after=r.score.a))
            else:
                outs.append(RefineResponse(image=img, route=r.route, p_after=min(1.0, r.score.p + 0.1),
                                           a_after=r.score.a))
        return outs
