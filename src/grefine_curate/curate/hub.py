"""Whether the Hugging Face Hub can be used from here, decided in seconds.

Without a network, huggingface_hub retries name resolution and connections for about a minute
per file before giving up. A user without internet should learn within seconds that weights are
missing and how to provide them, so before any download we check HF_HUB_OFFLINE and then open one
TCP connection to the hub's host with a short timeout (the answer is cached for the process).
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network access."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no", "off")


def hub_reachable(endpoint: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connection to the hub endpoint (HF_ENDPOINT, default huggingface.co:443)."""
    url = urlparse(endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    return _probe(host, port, timeout)


@functools.lru_cache(maxsize=None)
def _probe(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def downloads_allowed() -> bool:
    """Downloads are tried only when not offline by choice and the hub answers."""
    return not hub_offline() and hub_reachable()


def why_no_download() -> str:
    """A short reason for the error message when downloads_allowed() is False."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set, so no download was tried"
    return "the Hugging Face Hub cannot be reached from this machine, so no download was tried"
