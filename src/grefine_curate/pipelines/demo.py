"""A small example data set for ``make demo``, built from real photographs shipped with scikit-image.

Each photograph gets a hand-written prompt (some deliberately mention something the photo does not
show, so AQ-Map has unmatched phrases to find) and degraded copies the PQ-Map should rate lower:
Gaussian blur, noise, JPEG blocking and a corrupted (scrambled) region. One item holds broken
bytes, to show an error row. Everything goes into one Parquet shard, DIR/input/demo-00000.parquet,
with columns ``id``, ``image`` (encoded bytes), ``prompt``, ``degradation``.

    python -m grefine_curate.pipelines.demo --out DIR
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFilter

# name in skimage.data -> prompt (the phrases after "with"/"and" are often NOT in the photo)
PHOTOS = {
    "astronaut": "a portrait of an astronaut in a white spacesuit in front of an american flag",
    "coffee": "a cup of coffee on a saucer with a spoon and a red rose",
    "chelsea": "a tabby cat looking to the side with a blue collar",
    "rocket": "a rocket on the launch pad under a clear blue sky",
    "stereo_motorcycle": "a red motorcycle parked in a garage next to a yellow bicycle",
    "hubble_deep_field": "a deep field of distant galaxies in space",
}
DEMO_SIZE = 256  # long side of the demo images (keeps the tiny-preset run fast)


def _photo(name: str) -> Image.Image:
    from skimage import data

    arr = getattr(data, name)()
    if isinstance(arr, tuple):  # stereo_motorcycle: (left, right, disparity)
        arr = arr[0]
    img = Image.fromarray(arr).convert("RGB")
    img.thumbnail((DEMO_SIZE, DEMO_SIZE), Image.BICUBIC)
    return img


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def degrade(img: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    """Encoded bytes of a degraded copy: blur, noise, jpeg (blocking), region (scrambled patch)."""
    if kind == "blur":
        return _png(img.filter(ImageFilter.GaussianBlur(radius=4)))
    if kind == "noise":
        arr = np.asarray(img, dtype=np.float32)
        arr = np.clip(arr + rng.normal(0, 40, arr.shape), 0, 255).astype(np.uint8)
        return _png(Image.fromarray(arr))
    if kind == "jpeg":
        return _jpeg(img, quality=4)
    if kind == "region":
        arr = np.asarray(img).copy()
        h, w = arr.shape[:2]
        y0, x0, ph, pw = h // 3, w // 3, h // 3, w // 3
        patch = arr[y0 : y0 + ph, x0 : x0 + pw].reshape(-1, 3)
        arr[y0 : y0 + ph, x0 : x0 + pw] = rng.permutation(patch).reshape(ph, pw, 3)
        return _png(Image.fromarray(arr))
    raise ValueError(f"unknown degradation {kind!r}; expected blur, noise, jpeg or region")


def build_demo(out_dir: str, seed: int = 0) -> str:
    """Write DIR/input/demo-00000.parquet; returns its path."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"id": [], "image": [], "prompt": [], "degradation": []}

    def add(id_: str, data: bytes | None, prompt: str | None, kind: str) -> None:
        rows["id"].append(id_)
        rows["image"].append(data)
        rows["prompt"].append(prompt)
        rows["degradation"].append(kind)

    for name, prompt in PHOTOS.items():
        img = _photo(name)
        add(f"{name}", _jpeg(img, 92), prompt, "none")
        for kind in ("blur", "noise", "jpeg", "region"):
            add(f"{name}-{kind}", degrade(img, kind, rng), prompt, kind)
    # A prompt-less item (PQ only) and a broken one (becomes an error row; the job goes on).
    add("camera-noprompt", _png(_photo("camera")), None, "none")
    good = _jpeg(_photo("chelsea"), 92)
    add("chelsea-truncated", good[: len(good) // 3], PHOTOS["chelsea"], "corrupt")
    table = pa.table({
        "id": pa.array(rows["id"], pa.string()),
        "image": pa.array(rows["image"], pa.binary()),
        "prompt": pa.array(rows["prompt"], pa.string()),
        "degradation": pa.array(rows["degradation"], pa.string()),
    })
    path = os.path.join(out_dir, "input", "demo-00000.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for the demo (input/ is created inside)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = build_demo(args.out, args.seed)
    n = pq.ParquetFile(path).metadata.num_rows
    print(f"wrote {n} rows to {path}")
    print("next:")
    print(f"  grefine-curate run {os.path.join(args.out, 'input')} --out {os.path.join(args.out, 'refined')} "
          "--preset tiny")
    return 0


if __name__ == "__main__":
    sys.exit(main())
