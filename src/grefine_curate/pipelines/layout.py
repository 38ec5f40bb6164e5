"""Where a job keeps its state and its report under OUT, so that data readers see only data.

``pd.read_parquet(OUT)``, ``pyarrow.dataset.dataset(OUT)`` and ``datasets.load_dataset("parquet",
data_dir=OUT)`` read every file under OUT that they do not skip by name. pyarrow (and pandas through
it) skips names starting with ``_`` or ``.``; ``datasets`` skips hidden names and directories
starting with ``__``. So the job's own files live in ``OUT/__grefine__/`` (manifest, shard markers,
the internal audit of quantile routing) and the report is ``OUT/__grefine__/report.html``: visible
in a file browser, skipped by all three readers.

Outputs written before this layout kept their state in ``OUT/_grefine/`` and the report in
``OUT/report.html`` (which broke the readers); ``migrate_legacy_layout`` moves them on the next run
or ``report``, so a resumed job keeps its finished shards.
"""

from __future__ import annotations

import logging

import pyarrow.fs as pafs

from grefine_curate.curate.errors import InputError
from grefine_curate.pipelines.paths import (  # noqa: F401 (REPORT_REL, report_path: re-exported)
    LEGACY_REPORT_REL,
    LEGACY_STATE_DIR,
    REPORT_REL,
    STATE_DIR,
    join,
    report_path,
)

log = logging.getLogger(__name__)

def migrate_legacy_layout(fs: pafs.FileSystem, out_root: str) -> bool:
    """Move OUT/_grefine/ to OUT/__grefine__/ and drop the old OUT/report.html; True when something moved.

    Local folders only: an object store cannot rename a folder, so there the message says what to do.
    """
    legacy = join(out_root, f"{LEGACY_STATE_DIR}/manifest.json")
    if fs.get_file_info(legacy).type != pafs.FileType.File:
        return False
    new = join(out_root, STATE_DIR)
    if fs.get_file_info(new).type != pafs.FileType.NotFound:
        return False  # both exist: the new layout wins; the old folder is inert (readers skip '_' names)
    if not isinstance(fs, pafs.LocalFileSystem):
        raise InputError(
            f"{out_root} was written by an older grefine-curate (job state in {LEGACY_STATE_DIR}/); move "
            f"{LEGACY_STATE_DIR}/ to {STATE_DIR}/ (and delete {LEGACY_REPORT_REL}) to resume it, or choose another --out"
        )
    fs.move(join(out_root, LEGACY_STATE_DIR), new)
    old_report = join(out_root, LEGACY_REPORT_REL)
    if fs.get_file_info(old_report).type == pafs.FileType.File:
        fs.delete_file(old_report)  # it would make OUT unreadable as a Parquet data set
    log.warning("%s: moved the job state from %s/ to %s/ (the report is now %s)", out_root, LEGACY_STATE_DIR,
                STATE_DIR, REPORT_REL)
    return True
