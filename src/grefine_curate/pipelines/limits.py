"""What a smaller ``--limit`` would take away from a finished output, and removing it when forced.

``--limit N`` processes the first N rows in input order. A rerun with a larger limit (or none) only
adds rows: finished shards are reused and partial ones completed. A rerun with a *smaller* limit
would rewrite finished shards with fewer rows and leave the rest behind (shards past the limit,
images/ files of folder items past it), so it is a config change: refused unless ``--force``, and
then the rows past the limit are removed and the summary says how many. No rerun deletes results
silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.fs as pafs

from grefine_curate.curate.errors import ConfigError
from grefine_curate.pipelines.commit import read_json, try_delete
from grefine_curate.pipelines.paths import marker_path
from grefine_curate.pipelines.formats import get_format
from grefine_curate.pipelines.work import Shard


@dataclass
class Shrink:
    """A finished output shard that this run's limit would cut."""

    shard: Shard
    done_rows: int  # rows of the finished output
    new_rows: int  # rows this run keeps (0: the shard is past the limit)


def find_shrinks(fs: pafs.FileSystem, out_root: str, shards: list[Shard], caps: list[int | None]) -> list[Shrink]:
    """Finished shards (by their markers) holding more rows than this run's caps keep; ``caps`` has
    one entry per discovered shard, 0 for shards past the limit."""
    out = []
    for shard, cap in zip(shards, caps):
        if cap is None:
            continue  # no limit on this shard: nothing is cut
        marker = read_json(fs, marker_path(out_root, shard.rel))
        done = int(marker.get("rows", 0)) if marker else 0
        if done > cap:
            out.append(Shrink(shard=shard, done_rows=done, new_rows=cap))
    return out


def refuse_shrink(shrinks: list[Shrink], limit: int | None, out: str) -> None:
    first = shrinks[0]
    more = f" (and {len(shrinks) - 1} more shard(s))" if len(shrinks) > 1 else ""
    raise ConfigError(
        f"--limit {limit} would shrink finished results in {out}: {first.shard.rel} holds {first.done_rows} rows, "
        f"this run would keep {first.new_rows}{more}. A smaller --limit is a config change: pass --force to "
        "recompute with it (the rows past the limit are removed), or choose another --out."
    )


def remove_past_limit(fs: pafs.FileSystem, out_root: str, shrinks: list[Shrink], limit: int | None) -> str:
    """Delete what lies past the limit: whole shards (output + marker) and folder images; a summary note."""
    rows = 0
    for s in shrinks:
        rows += s.done_rows - s.new_rows
        get_format(s.shard.format).drop_past(fs, out_root, s.shard, s.new_rows, s.done_rows)  # outputs, mirrored images
        if s.new_rows == 0:
            try_delete(fs, marker_path(out_root, s.shard.rel))
        # else: the shard is recomputed with the smaller cap and replaces its output
    return (f"--force with a smaller --limit {limit}: removed {rows} row(s) of an earlier run past the limit "
            f"({len(shrinks)} shard(s))")
