"""One job at a time per OUT: ``OUT/__grefine__/lock.json`` names the holder (host, pid, start, command).

A second job is refused at once with a line naming the holder, or waits for it (``wait_s``). A lock
whose holder is gone (same host, no such process) is taken over, so a killed job never leaves OUT
stuck; a lock from another host is trusted until it is older than ``stale_s`` (its job cannot be
checked from here). On a local disk the lock file is created exclusively (O_EXCL: two starts cannot
both win); on an object store, which pyarrow gives no conditional put, it is written and read back,
and the job with the earliest token wins (a narrow race remains: documented).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from grefine_curate.curate.errors import InputError
from grefine_curate.pipelines.commit import read_json, try_delete, write_atomic
from grefine_curate.pipelines.paths import lock_path

STALE_S = 24 * 3600.0  # a lock from another host older than this is taken over
POLL_S = 2.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(h: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(h.get("started", 0))))
    return f"pid {h.get('pid')} on {h.get('host')} since {since} ({h.get('what', 'a job')})"


@dataclass
class OutLock:
    fs: pafs.FileSystem
    root: str
    token: str
    path: str

    def release(self) -> None:
        held = read_json(self.fs, self.path)
        if held is not None and held.get("token") == self.token:
            try_delete(self.fs, self.path)

    def __enter__(self) -> "OutLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _stale(h: dict[str, Any], host: str) -> bool:
    if h.get("host") == host:
        return not _alive(int(h.get("pid", -1)))
    return time.time() - float(h.get("started", 0)) > STALE_S


def acquire(fs: pafs.FileSystem, root: str, what: str, wait_s: float = 0.0) -> OutLock:
    """Take OUT's lock or raise InputError (exit 2) naming its holder; ``wait_s`` > 0 waits that long."""
    host = socket.gethostname()
    me = {"host": host, "pid": os.getpid(), "started": time.time(), "token": uuid.uuid4().hex, "what": what}
    path = lock_path(root)
    deadline = time.monotonic() + wait_s
    while True:
        if _try_take(fs, path, me, host):
            return OutLock(fs, root, me["token"], path)
        held = read_json(fs, path) or {}
        if time.monotonic() >= deadline:
            raise InputError(f"{root} is in use by another job: {_describe(held)}. Wait for it to finish, pass "
                             "--wait-lock SECONDS to wait, or choose another --out")
        time.sleep(POLL_S)


def _try_take(fs: pafs.FileSystem, path: str, me: dict[str, Any], host: str) -> bool:
    data = json.dumps(me).encode()
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = read_json(fs, path)
                if held is not None and not _stale(held, host):
                    return False
                try:  # a dead holder's lock (or an unreadable half-written one): take it over once
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        return False
    held = read_json(fs, path)
    if held is not None and not _stale(held, host):
        return False
    write_atomic(fs, path, data)
    time.sleep(0.2)  # a racing writer's object lands within this; the last write wins, and only it proceeds
    back = read_json(fs, path) or {}
    return back.get("token") == me["token"]
