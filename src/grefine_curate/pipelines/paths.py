"""Every path of the job: URIs to (filesystem, path), and the one place that names what lives under OUT.

OUT holds only data: the outputs at their inputs' relative paths (named by each format's layout,
``formats/``), mirrored images, and, for image folders, ``metadata.jsonl``. Everything else, the
job's state, is under ``OUT/__grefine__/`` (data readers skip ``__`` names) and never ends in
``.parquet`` (so ``OUT/**/*.parquet`` globs, as duckdb and polars take them, see outputs only):

    __grefine__/manifest.json              the job: config, inputs and their formats, counts
    __grefine__/shards/<output>.json       one completion marker per output (datatrove-style)
    __grefine__/units/<output>/S-E.part    a work unit's committed part (Parquet bytes)
    __grefine__/audit/                     the score pass of a two-pass run (outputs named *.scores)
    __grefine__/lock.json                  the job that holds OUT
    __grefine__/report.html                the report

Temporary files carry TMP_MARK in their (hidden) names; stale ones are deleted by the next run.
"""

from __future__ import annotations

import os
import posixpath
import re

import pyarrow as pa
import pyarrow.fs as pafs

from grefine_curate.curate.errors import InputError

TMP_MARK = ".grefine-tmp-"  # temporary output files carry this in their name (never read as input)
STATE_DIR = "__grefine__"  # job state and report under OUT; data readers skip '__' names
LEGACY_STATE_DIR = "_grefine"  # where outputs of earlier versions kept it (still never read as input)
UNITS_DIR = f"{STATE_DIR}/units"
AUDIT_DIR = f"{STATE_DIR}/audit"
PART_SUFFIX = ".part"  # a unit's part: Parquet bytes under a name no '*.parquet' glob takes
INTERNAL_SUFFIX = ".scores"  # outputs of the internal audit of a two-pass run (Parquet bytes)
REPORT_REL = f"{STATE_DIR}/report.html"
LEGACY_REPORT_REL = "report.html"


# ---------------------------------------------------------------------------------------------
# URIs


def _endpoint_note() -> str:
    ep = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    return f" (endpoint {ep} from AWS_ENDPOINT_URL)" if ep else ""


def resolve_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or any URI pyarrow supports (s3://, gs://, hdfs://, file://)."""
    uri = str(uri)
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise InputError(f"cannot open {mask_secret(uri)}{_endpoint_note()}: {e} "
                             "(is the URI scheme supported and the store reachable?)") from e
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)).replace("\\", "/")


def fs_uri(fs: pafs.FileSystem, path: str) -> str:
    """The URI of a (filesystem, path) pair, inverse of resolve_fs: a plain path for local files."""
    scheme = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs"}.get(fs.type_name)
    return f"{scheme}://{path}" if scheme else path


def mask_secret(uri: str) -> str:
    """A URI as messages and the manifest show it: credentials (s3://KEY:SECRET@bucket/...) masked."""
    return re.sub(r"^([a-z0-9+.-]+://)[^/@]+@", r"\1***@", uri) if isinstance(uri, str) else uri


def store_error(uri: str, e: BaseException) -> InputError:
    """One line for an object store that cannot be reached (a wrong endpoint, no network, no bucket)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return InputError(f"{mask_secret(uri)}: the store cannot be reached{_endpoint_note()}: {first}; "
                      "check the endpoint, the bucket and the credentials")


def reachable(fs: pafs.FileSystem, path: str, uri: str) -> pafs.FileInfo:
    """The info of ``path``, or one line (InputError, exit 2) when its store cannot be reached."""
    try:
        return fs.get_file_info(path)
    except OSError as e:
        if isinstance(fs, pafs.LocalFileSystem):
            raise InputError(f"{uri}: {e}") from e
        raise store_error(uri, e) from e


def join(base: str, rel: str) -> str:
    return posixpath.join(base.rstrip("/"), rel) if base else rel


def inside(path: str, root: str | None) -> bool:
    return bool(root) and (path == root or path.startswith(root.rstrip("/") + "/"))


def safe_relpath(rel: str) -> str:
    """A relative output path that cannot leave its root: no absolute part, no '..', no empty parts.

    Output names derive from input file names and ids, which are data: '../../etc/x', 'C:\\x' or
    '/abs' must never write outside OUT. Unsafe parts are dropped; odd characters are replaced.
    """
    parts = []
    for part in re.split(r"[\\/]+", rel):
        part = part.strip()
        if part in ("", ".", ".."):
            continue
        part = re.sub(r"[\x00-\x1f:*?\"<>|]", "_", part)  # control chars and Windows-reserved ones
        parts.append(part)
    if not parts:
        raise InputError(f"cannot derive a safe output name from {rel!r}")
    return "/".join(parts)


def is_hidden_or_state(rel: str) -> bool:
    """Hidden files (".x"), our job state (__grefine__/, formerly _grefine/) and our temporaries are never input data."""
    return any(p.startswith(".") or p in (STATE_DIR, LEGACY_STATE_DIR) for p in rel.split("/")) or TMP_MARK in rel


def list_files(fs: pafs.FileSystem, root: str) -> tuple[list[pafs.FileInfo], list[str]]:
    """(every file under ``root``, recursively; the links not followed, each with why).

    On a local disk links are followed only where they stay inside ``root``: a link that leaves it,
    or leads back to a folder already walked (a loop), is not followed, and a file reached twice
    through links is listed once (by its first path in sorted order). Object stores have no links.
    Raises FileNotFoundError when ``root`` does not exist."""
    if not isinstance(fs, pafs.LocalFileSystem):
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        return [i for i in infos if i.type == pafs.FileType.File], []
    if not os.path.isdir(root):
        raise FileNotFoundError(root)
    real_root = os.path.realpath(root)
    seen_dirs, seen_files = {real_root}, set()
    out: list[pafs.FileInfo] = []
    skipped: list[str] = []

    def walk(d: str) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            skipped.append(f"{d} (cannot list: {e.strerror})")
            return
        for e in entries:
            path = e.path.replace("\\", "/")
            link = e.is_symlink()
            real = os.path.realpath(path) if link else None
            if link and not inside(real, real_root):
                skipped.append(f"{path} (a link leaving the input, to {real})")
                continue
            if e.is_dir(follow_symlinks=True):
                key = real or os.path.realpath(path)
                if key in seen_dirs:
                    skipped.append(f"{path} (a link back to a folder already read: a loop)")
                    continue
                seen_dirs.add(key)
                walk(path)
            elif e.is_file(follow_symlinks=True):
                key = real or os.path.realpath(path)
                if key in seen_files:
                    continue  # the same file through a link: read once
                seen_files.add(key)
                st = e.stat(follow_symlinks=True)
                out.append(pafs.FileInfo(path, type=pafs.FileType.File, mtime_ns=st.st_mtime_ns, size=st.st_size))

    walk(root.rstrip("/") or "/")
    return out, skipped


# ---------------------------------------------------------------------------------------------
# Under OUT


def manifest_path(out_root: str) -> str:
    return join(out_root, f"{STATE_DIR}/manifest.json")


def marker_path(out_root: str, rel: str) -> str:
    """Completion marker of one output shard: OUT/__grefine__/shards/<rel>.json."""
    return join(out_root, f"{STATE_DIR}/shards/{rel}.json")


def part_path(out_root: str, rel: str, start: int, stop: int) -> str:
    """Where a unit's committed part lives: OUT/__grefine__/units/<output rel>/<start>-<stop>.part."""
    return join(out_root, f"{UNITS_DIR}/{rel}/{start:010d}-{stop:010d}{PART_SUFFIX}")


def parts_dir(out_root: str, rel: str) -> str:
    return join(out_root, f"{UNITS_DIR}/{rel}")


def report_path(out_root: str) -> str:
    return join(out_root, REPORT_REL)


def lock_path(out_root: str) -> str:
    return join(out_root, f"{STATE_DIR}/lock.json")


def audit_root(out_root: str) -> str:
    return join(out_root, AUDIT_DIR)
