"""Work units below the file: the unit of scheduling, retry and resume.

A Parquet shard is cut into units of whole row groups of about ``unit_rows`` rows (a unit never
splits a row group: it is read with ``iter_batches(row_groups=...)``, so no worker decodes rows it
does not own); an image-folder shard and a WebDataset tar into runs of ``unit_rows`` images/samples
(a tar unit starts reading at its first sample's header offset, recorded at discovery). Units are
scheduled over all workers, largest first, so one big file keeps every GPU busy.

A shard of one unit writes its output file directly (as before units existed). A shard of several
units has each unit write a *part* under ``OUT/__grefine__/units/<output>/<start>-<stop>.part``,
committed on its own (temporary name, footer with its commit record, rename): a finished unit is
never recomputed, even after ``kill -9``. When the last unit of a shard lands, the driver
concatenates the parts (row group by row group: Parquet pages are re-compressed, image bytes are
copied, never re-encoded) into the output at the shard's relative path, writes its marker and
deletes the parts (a tar's part tars are concatenated member by member into its tar first). The
output contract is unchanged: one output per input, every row exactly once,
in input order, every input column kept.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from grefine_curate.pipelines.commit import ParquetFile, write_atomic
from grefine_curate.pipelines.manifest import companions_present
from grefine_curate.pipelines.paths import join, marker_path, part_path, parts_dir
from grefine_curate.pipelines.records import read_record, record_matches
from grefine_curate.pipelines.formats import get_format
from grefine_curate.pipelines.work import Shard, ShardResult, ShardTask, Unit, as_result, unit_summary


def plan_units(shard: Shard, row_cap: int | None, unit_rows: int) -> list[Unit]:
    """The units of one shard, in input order, covering rows [0, min(num_rows, row_cap)) (its format cuts them)."""
    end = shard.num_rows if row_cap is None else min(row_cap, shard.num_rows)
    if end <= 0:
        return []
    return get_format(shard.format).units(shard, end, unit_rows)


@dataclass
class _Book:
    shard: Shard
    row_cap: int | None
    units: list[Unit]
    done: dict[int, dict[str, Any]] = field(default_factory=dict)  # unit start -> its result (to_json)


class UnitLedger:
    """The driver's book of units: which parts are committed, and the assembly when a shard is complete."""

    def __init__(self, out_fs: pafs.FileSystem, out_root: str, fingerprint: str):
        self.fs, self.root, self.fingerprint = out_fs, out_root, fingerprint
        self.books: dict[str, _Book] = {}
        # Assembly runs on a driver thread: copying a big file's parts (GBs of refined images on an
        # object store) must not hold up handing the next units to the workers.
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[tuple[str, Future]] = []

    def plan(self, shard: Shard, row_cap: int | None, unit_rows: int, resume: bool) -> list[ShardTask]:
        """The tasks still to run for an incomplete shard; parts committed by an earlier run are kept."""
        units = plan_units(shard, row_cap, unit_rows)
        if len(units) <= 1:  # the whole shard is one unit: it writes the output file itself
            self.drop_parts(shard.rel)  # parts of an earlier, differently cut run are orphans now
            return [ShardTask(shard=shard, out_fs=self.fs, out_root=self.root, row_cap=row_cap)]
        book = _Book(shard, row_cap, units)
        self.books[shard.rel] = book
        if not resume:
            self.drop_parts(shard.rel)
        for u in units:
            if not resume:
                break
            rec, rows = read_record(self.fs, part_path(self.root, shard.rel, u.start, u.stop))
            if record_matches(rec, rows, fingerprint=self.fingerprint, source_key=shard.source_key,
                              start=u.start, stop=u.stop) and rows == u.rows and companions_present(
                                  self.fs, self.root, rec):  # a tar unit's part tar, same size
                book.done[u.start] = rec
        return [ShardTask(shard=shard, out_fs=self.fs, out_root=self.root, row_cap=row_cap, start=u.start,
                          stop=u.stop, row_groups=u.row_groups, part=True)
                for u in units if u.start not in book.done]

    def complete_now(self) -> list[ShardResult]:
        """Shards whose every unit was committed by an earlier run (killed before assembling): assemble them."""
        return [self._assemble(b) for b in list(self.books.values()) if len(b.done) == len(b.units)]

    def finish(self, res: ShardResult) -> list[ShardResult]:
        """Record a finished unit; returns the shards completed since the last call: a whole shard at
        once, split shards as their background assembly (started by their last unit) completes;
        ``drain`` hands over the rest, and any failure."""
        out = [] if res.part else [res]
        if res.part:
            book = self.books[res.rel]
            book.done[res.start] = res.to_json()
            if len(book.done) == len(book.units):
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grefine-assemble")
                self._pending.append((res.rel, self._pool.submit(self._assemble, book)))
        ready = [(rel, f) for rel, f in self._pending if f.done() and f.exception() is None]
        self._pending = [p for p in self._pending if p not in ready]
        return out + [f.result() for _, f in ready]

    def drain(self) -> tuple[list[ShardResult], list[tuple[str, str]]]:
        """Wait for the assemblies started by ``finish``: (shard results, (shard, message) failures)."""
        done: list[ShardResult] = []
        failed: list[tuple[str, str]] = []
        for rel, fut in self._pending:
            try:
                done.append(fut.result())
            except Exception as e:  # noqa: BLE001 - one file that cannot be assembled: its parts stay for a rerun
                failed.append((rel, f"assembling the output from its units failed: {type(e).__name__}: {e}"))
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        return done, failed

    def _assemble(self, book: _Book) -> ShardResult:
        """Concatenate the parts in row order into the output (temporary name, record in the footer,
        rename), after the format joined what the units wrote beside them; write the marker, delete the parts."""
        t0 = time.perf_counter()
        shard = book.shard
        final = join(self.root, shard.record_rel)
        parts = [part_path(self.root, shard.rel, u.start, u.stop) for u in book.units]
        companions = get_format(shard.format).assemble(self.fs, self.root, shard, parts, [book.done[u.start] for u in book.units])
        status: Counter[str] = Counter()
        routes: Counter[str] = Counter()
        rows = 0
        writer = None
        try:
            for u, part in zip(book.units, parts):
                with self.fs.open_input_file(part) as f:
                    pf = pq.ParquetFile(f)
                    if writer is None:
                        writer = ParquetFile(self.fs, final, pf.schema_arrow)
                    for g in range(pf.num_row_groups):  # one row group in memory at a time
                        writer.write_table_now(pf.read_row_group(g))
                    rows += pf.metadata.num_rows
                rec = book.done[u.start]
                status.update(rec.get("status", {}))
                routes.update(rec.get("routes", {}))
            expected = sum(u.rows for u in book.units)
            assert rows == expected, f"{shard.rel}: parts hold {rows} rows, the units {expected}"
            units = [unit_summary(as_result(book.done[u.start])) for u in book.units]
            res = ShardResult(rel=shard.rel, rows=rows, status=dict(status), routes=dict(routes),
                              seconds=round(sum(x["seconds"] for x in units) + time.perf_counter() - t0, 3),
                              output=final, start=0, stop=rows)
            record = {**res.to_json(), "input": shard.path, "format": shard.format, "source_key": shard.source_key,
                      "fingerprint": self.fingerprint, "row_cap": book.row_cap, "units": units,
                      "companions": companions}
            writer.commit(record)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        write_atomic(self.fs, marker_path(self.root, shard.rel),
                     json.dumps({**record, "finished_at": time.time()}, indent=1).encode())
        self.drop_parts(shard.rel)
        self.books.pop(shard.rel, None)
        return res

    def drop_parts(self, rel: str) -> None:
        """Delete a shard's parts (after its output is complete, or when recomputing everything)."""
        d = parts_dir(self.root, rel)
        try:
            if self.fs.get_file_info(d).type == pafs.FileType.Directory:
                self.fs.delete_dir(d)
        except (OSError, FileNotFoundError):
            pass  # leftovers are harmless: the next run of this shard ignores parts that do not match
