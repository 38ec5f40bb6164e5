"""Peak memory of streaming a WebDataset tar: 200 MB vs 2 GB (the reader must not buffer the tar).

    .venv/bin/python bench/tar_memory.py [--small-mb 200] [--big-mb 2048] [--member-kb 512]

1. Two tars of samples ``KEY.jpg`` (``--member-kb`` of random bytes: the reader does not decode) +
   ``KEY.txt``, of about ``--small-mb`` and ``--big-mb``, written to a temporary directory.
2. In a fresh process each: count the samples from the headers (what discovery does), then stream
   every sample through ``iter_samples`` (what a work unit reads) and through ``TarSink`` into an
   output tar (what refine mode writes), touching each member's bytes. Peak RSS is ``ru_maxrss``.

Last line: ``ratio: <peak RSS at big / peak RSS at small>`` (goal <= 1.15: memory does not grow
with the tar). The models are not involved: the job adds a constant (models, two batches of
decoded images) on top.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import json, resource, sys
import pyarrow.fs as pafs
from grefine_curate.pipelines.tar_shards import TarSink, count_samples, iter_samples
fs = pafs.LocalFileSystem()
n = count_samples(fs, sys.argv[1])
sink = TarSink(fs, sys.argv[2])
seen = total = 0
for s in iter_samples(fs, sys.argv[1]):
    seen += 1
    total += sum(len(m.data) for m in s.members)
    sink.write(s, None, {"grefine_status": "ok"}, None)
sink.commit()
print(json.dumps({"samples": n, "streamed": seen, "bytes": total,
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def write_tar(path: str, mb: int, member_kb: int) -> int:
    n = max(1, mb * 1024 // member_kb)
    blob = os.urandom(member_kb * 1024)
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            for name, data in ((f"{i:09d}.jpg", blob[i % 97:] + blob[: i % 97]), (f"{i:09d}.txt", b"a prompt")):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return n


def measure(tar: str, out: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    r = subprocess.run([sys.executable, "-c", SCRIPT, tar, out], env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small-mb", type=int, default=200)
    ap.add_argument("--big-mb", type=int, default=2048)
    ap.add_argument("--member-kb", type=int, default=512)
    ap.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed after)")
    args = ap.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="grefine-bench-tar-")
    try:
        res = {}
        for label, mb in (("small", args.small_mb), ("big", args.big_mb)):
            tar = os.path.join(work, f"{label}.tar")
            t = time.perf_counter()
            n = write_tar(tar, mb, args.member_kb)
            size = os.path.getsize(tar)
            r = measure(tar, os.path.join(work, f"{label}-out.tar"))
            assert r["samples"] == r["streamed"] == n, r
            print(f"{label}: {size / 2**20:.0f} MB tar, {n} samples: peak RSS {r['maxrss_kb'] / 1024:.0f} MB "
                  f"({time.perf_counter() - t:.1f}s incl. writing it)")
            res[label] = r
            os.remove(tar)
            os.remove(os.path.join(work, f"{label}-out.tar"))
        print(f"ratio: {res['big']['maxrss_kb'] / res['small']['maxrss_kb']:.3f}")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
