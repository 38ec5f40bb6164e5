"""Fault injection for tests, through the seams the job already has: ``JobConfig.batch_hook`` (called
after each batch, in the process that runs the unit: the driver or a Ray actor) and
``JobConfig.engine_factory`` (builds the models). Nothing here runs unless a caller injects it; the
objects are picklable module-level classes, so they reach Ray actors unchanged.
"""

from __future__ import annotations

import os
import time

from grefine_curate.curate.errors import ModelUnavailableError


class Delay:
    """Sleep after every batch (gives a test time to kill the job mid-shard)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, batch_index: int) -> None:
        time.sleep(self.seconds)


class DieOnce:
    """The process running a unit dies after its second batch, once per ``sentinel`` file (a worker
    crash: a partial temporary is left behind)."""

    def __init__(self, sentinel: str, at_batch: int = 1):
        self.sentinel, self.at_batch = sentinel, at_batch

    def __call__(self, batch_index: int) -> None:
        if batch_index == self.at_batch and not os.path.exists(self.sentinel):
            with open(self.sentinel, "w") as f:
                f.write(str(os.getpid()))
            os._exit(17)


class NoModels:
    """An engine factory that refuses: proves a run never loaded models."""

    def __call__(self, spec) -> None:
        raise ModelUnavailableError("models were about to load although the test said they must not")
