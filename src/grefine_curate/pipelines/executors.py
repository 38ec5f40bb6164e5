"""Executors: run the processor over pending work units, in-process or on Ray actors.

- ``run_local``: the same processor in this process (tests, debugging, small jobs).
- ``run_ray``: a local Ray instance with zero set-up (or a cluster via ``--address`` /
  ``RAY_ADDRESS``). Actors (one per GPU; on CPU-only clusters ``workers`` CPU actors) load the
  models once and stream their unit in batches; each unit call is a streaming generator that
  reports items done per batch, so the driver shows item-level progress while holding no rows.
  A worker that dies mid-unit (crash, OOM kill, node loss) is replaced and its unit resubmitted
  (up to ``max_attempts``) to the next free worker; its partial temporary file is never renamed,
  so nothing is counted twice.

Each finished unit goes to ``finish`` (the driver's UnitLedger), which assembles a file's output
when its last unit lands.

Both report progress on the driver: tqdm bars over items and shards on a terminal, plain log
lines otherwise, nothing with ``quiet``.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

from grefine_curate.curate.errors import ModelUnavailableError
from grefine_curate.pipelines.commit import clean_shard_temporaries
from grefine_curate.pipelines.processor import (
    EngineSpec,
    ProcessOptions,
    ShardResult,
    ShardTask,
    build_engine,
    process_shard,
)

LOG_EVERY_S = 10.0  # plain-log progress interval when stderr is not a terminal
REPLACEMENT_WAIT_S = float(os.environ.get("GREFINE_REPLACEMENT_WAIT_S", 600))  # no live worker: give up after this


# ---------------------------------------------------------------------------------------------
# Progress on the driver


class Progress:
    """tqdm bars over items and shards (rate, ETA) on a TTY; plain lines otherwise; silent when quiet."""

    def __init__(self, total_items: int, total_shards: int, quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total_items, self.total_shards = total_items, total_shards
        self.done_items = self.done_shards = 0
        self.t0 = time.perf_counter()
        self._last_log = self.t0
        self._bars = None
        # The bars are drawn with the first finished work, not here: what prints during start-up (Ray's
        # notices, model loading) would otherwise tear them.
        self._want_bars = not quiet and self.tty

    def _start_bars(self) -> None:
        if self._want_bars and self._bars is None:
            from tqdm.auto import tqdm

            self._want_bars = False
            self._bars = (
                tqdm(total=self.total_shards, desc="shards", unit="shard", position=0, file=self.stream,
                     dynamic_ncols=True, initial=self.done_shards),
                tqdm(total=self.total_items, desc="images", unit="img", position=1, file=self.stream,
                     dynamic_ncols=True, smoothing=0.1, initial=self.done_items),
            )

    def say(self, msg: str, always: bool = False) -> None:
        if self.quiet and not always:
            return
        if self._bars is not None:
            self._bars[0].write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def items(self, n: int) -> None:
        self._start_bars()
        self.done_items += n
        if self._bars is not None:
            self._bars[1].update(n)
        elif not self.quiet and time.perf_counter() - self._last_log >= LOG_EVERY_S:
            self._log_line()

    def _log_line(self) -> None:
        dt = time.perf_counter() - self.t0
        rate = self.done_items / dt if dt > 0 else 0.0
        left = self.total_items - self.done_items
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        self.say(f"progress: {self.done_items}/{self.total_items} images, {self.done_shards}/{self.total_shards} "
                 f"shards, {rate:.1f} img/s, ETA {eta}")
        self._last_log = time.perf_counter()

    def shard_done(self, res: ShardResult) -> None:
        self._start_bars()
        self.done_shards += 1
        if self._bars is not None:
            self._bars[0].update(1)
        else:
            err = res.status.get("error", 0)
            self.say(f"shard done: {res.rel} ({res.rows} rows, {err} errors, {res.seconds:.1f}s) "
                     f"[{self.done_shards}/{self.total_shards}]")

    def rollback(self, n: int) -> None:
        """A failed attempt's items are counted again by its retry."""
        self.done_items -= n
        if self._bars is not None:
            self._bars[1].update(-n)

    def close(self) -> None:
        if self._bars is not None:
            for b in reversed(self._bars):
                b.close()
            self._bars = None


@dataclass
class ExecReport:
    results: list[ShardResult] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (shard rel, message)
    interrupted: bool = False
    startup_s: float = 0.0  # start-up before the first shard: Ray init (if started here) + model loading
    retries: int = 0
    workers: int = 1
    units: int = 0  # work units completed by this run (a shard of several units counts once in results)
    rows: int = 0  # rows those units processed
    rows_by_shard: dict[str, int] = field(default_factory=dict)  # ... per shard (rel)


Finish = Callable[[ShardResult], "list[ShardResult]"]


def _landed(report: ExecReport, progress: Progress, finish: Finish | None, res: ShardResult) -> None:
    """A unit finished: hand it to the ledger (which assembles its shard after the last unit)."""
    report.units += 1
    report.rows += res.rows
    report.rows_by_shard[res.rel] = report.rows_by_shard.get(res.rel, 0) + res.rows
    for shard_res in finish(res) if finish is not None else [res]:
        report.results.append(shard_res)
        progress.shard_done(shard_res)


# ---------------------------------------------------------------------------------------------
# Local


_ENGINE_CACHE: dict[Any, Any] = {}


def cached_engine(spec: EngineSpec):
    """Models load once per process: a notebook or test session running several jobs reuses them."""
    key = spec.key()
    if key not in _ENGINE_CACHE:
        _ENGINE_CACHE.clear()  # one engine at a time bounds memory
        _ENGINE_CACHE[key] = build_engine(spec)
    engine = _ENGINE_CACHE[key]
    if hasattr(engine, "ensure_mode"):
        engine.ensure_mode(spec.mode)
    return engine


def run_local(tasks: list[ShardTask], spec: EngineSpec, opts: ProcessOptions, progress: Progress,
              finish: Finish | None = None) -> ExecReport:
    report = ExecReport(workers=1)
    if not tasks:
        return report
    t0 = time.perf_counter()
    if opts.scores_uri is not None:  # reusing an audit: models load only if an item needs them
        from grefine_curate.pipelines.engines import LazyEngine

        engine = LazyEngine(lambda: cached_engine(spec), spec.preset.seed)
    else:
        engine = cached_engine(spec)
    report.startup_s = time.perf_counter() - t0  # model loading (0 when this process has them already)
    for task in tasks:
        done = 0
        try:
            for ev in process_shard(task, engine, opts):
                if isinstance(ev, int):
                    done += ev
                    progress.items(ev)
                else:
                    done = 0  # the unit is committed: a failure after this point does not undo its items
                    _landed(report, progress, finish, ev)
        except KeyboardInterrupt:
            report.interrupted = True
            return report
        except ModelUnavailableError:
            raise  # (a lazily loaded engine) every shard would fail the same way: stop now
        except Exception as e:  # noqa: BLE001 - one broken shard must not stop the others
            progress.rollback(done)
            report.failures.append((task.shard.rel, f"{type(e).__name__}: {e}"))
            progress.say(f"shard failed: {task.shard.rel}: {type(e).__name__}: {e}", always=True)
    return report


# ---------------------------------------------------------------------------------------------
# Ray


class ShardWorker:
    """A Ray actor: loads the models once, then streams one shard per call."""

    def __init__(self, spec: EngineSpec, threads: int):
        import ray
        import torch

        torch.set_num_threads(max(1, threads))
        self.spec = spec
        self.engine = None
        self.node_id = ray.get_runtime_context().get_node_id()  # recorded per unit in the shard marker

    def ready(self, load: bool = True) -> int:
        """Load the models now, so a load failure surfaces before any shard is handed out."""
        if load and self.engine is None:
            self.engine = build_engine(self.spec)
        return os.getpid()

    def _engine(self):
        self.ready()
        return self.engine

    def process(self, task: ShardTask, opts: ProcessOptions):
        if opts.scores_uri is not None and self.engine is None:  # reusing an audit: load only if needed
            from grefine_curate.pipelines.engines import LazyEngine

            engine = LazyEngine(self._engine, self.spec.preset.seed)
        else:
            engine = self._engine()
        yield from process_shard(task, engine, opts, node_id=self.node_id)


# Object-store endpoints (MinIO, R2, GCS interop) must reach the actors too; credentials are not
# forwarded (runtime_env is visible in the dashboard): workers use their own (env, profile, IAM role).
_FORWARD_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def _forwarded_env() -> dict[str, str]:
    """Env vars the actors need from the driver (offline flags, cache dirs, GREFINE_* settings)."""
    return {k: v for k, v in os.environ.items() if k in _FORWARD_ENV or k.startswith("GREFINE_")}


def init_ray(address: str | None = None) -> tuple[bool, float]:
    """Join a running Ray (this process's, --address, RAY_ADDRESS) or start a local one.

    Returns (started_here, seconds). A local instance keeps its files in a temporary directory under
    /tmp (not OUT: Ray's socket paths must stay short) and runs without a dashboard.
    """
    import ray

    if ray.is_initialized():
        return False, 0.0
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = time.perf_counter()
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Worker output (library warnings) stays in Ray's log files; failures come back as exceptions.
    common = dict(logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)
    if address:
        ray.init(address=address, **common)
    else:
        # A local instance keeps Ray's default token authentication; its notice that it does so is not
        # news to a user who never configured Ray (and it tore the progress bar): kept out of the output.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="grefine-ray-", dir="/tmp"), **common)
    return True, time.perf_counter() - t0


def _plan_workers(workers: int | None, gpus_per_worker: float, n_tasks: int) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) from the cluster's resources."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 1.0)), float(res.get("GPU", 0.0))
    if gpus > 0 and gpus_per_worker > 0:
        n = workers or max(1, int(gpus // gpus_per_worker))
        return max(1, min(n, n_tasks)), 1.0, gpus_per_worker
    # CPU only: a few multi-threaded actors beat many single-threaded ones (torch intra-op threads)
    n = workers or max(1, int(cpus // 4))
    n = max(1, min(n, n_tasks))
    per = cpus / n
    return n, (float(int(per)) if per >= 1 else per), 0.0


def run_ray(tasks: list[ShardTask], spec: EngineSpec, opts: ProcessOptions, progress: Progress, *,
            address: str | None = None, workers: int | None = None, gpus_per_worker: float = 1.0,
            max_attempts: int = 3, finish: Finish | None = None, threads_per_worker: int | None = None) -> ExecReport:
    import ray
    from ray.exceptions import ActorDiedError, ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError

    report = ExecReport()
    if not tasks:
        return report
    started, report.startup_s = init_ray(address)
    n, cpus, gpus = _plan_workers(workers, gpus_per_worker, len(tasks))
    report.workers = n
    actor_cls = ray.remote(ShardWorker).options(
        num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0, max_concurrency=1,
        runtime_env={"env_vars": _forwarded_env()},
    )

    threads = threads_per_worker or (max(1, int(round(cpus))) if not gpus else 2)

    def new_actor():
        return actor_cls.remote(spec, threads)

    actors: list[Any] = [new_actor() for _ in range(n)]
    queue: deque[ShardTask] = deque(tasks)
    active: dict[Any, tuple[int, ShardTask]] = {}
    counted: dict[int, int] = {}  # items reported by the current attempt on actor i
    starting: dict[Any, int] = {}  # ready() of replacement actors -> their slot

    def submit(i: int) -> None:
        if queue:
            task = queue.popleft()
            active[actors[i].process.remote(task, opts)] = (i, task)
            counted[i] = 0

    try:
        t_ready = time.perf_counter()
        try:
            ray.get([a.ready.remote(opts.scores_uri is None) for a in actors])  # --scores: models load lazily
        except RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            raise cause from None  # the models cannot load: every shard would fail the same way
        report.startup_s += time.perf_counter() - t_ready  # actors up, models loaded
        for i in range(n):
            submit(i)
        idle_since = time.perf_counter()
        while active or (queue and starting):
            ready, _ = ray.wait(list(active) + list(starting), num_returns=1, timeout=1.0)
            if active or ready:
                idle_since = time.perf_counter()
            elif time.perf_counter() - idle_since > REPLACEMENT_WAIT_S:
                # every worker died and none can be placed again (a lost node took the capacity)
                msg = (f"no worker could be started for {REPLACEMENT_WAIT_S:.0f}s (each needs {cpus:g} CPU, "
                       f"{gpus:g} GPU); the cluster lost the capacity")
                report.failures.extend((t.shard.rel, msg) for t in queue)
                progress.say(f"giving up on {len(queue)} unit(s): {msg}", always=True)
                queue.clear()
                break
            for gen in ready:
                if gen in starting:  # a replacement worker is up: only now does it take a unit
                    i = starting.pop(gen)
                    try:
                        ray.get(gen)
                    except Exception as e:  # noqa: BLE001 - it could not start; the other workers go on
                        progress.say(f"a replacement worker could not start: {type(e).__name__}: {e}", always=True)
                        continue
                    submit(i)
                    continue
                i, task = active[gen]
                try:
                    ev = ray.get(next(gen))
                except StopIteration:
                    del active[gen]
                    submit(i)
                    continue
                except (ActorDiedError, RayActorError, WorkerCrashedError, ObjectLostError) as e:
                    del active[gen]
                    progress.rollback(counted.get(i, 0))
                    try:
                        ray.kill(actors[i], no_restart=True)
                    except Exception:  # noqa: BLE001 - already gone
                        pass
                    actors[i] = new_actor()
                    # The replacement takes work once it is up; until then the lost unit waits in the queue
                    # for whichever worker frees first (after a node loss there may be no room for it).
                    starting[actors[i].ready.remote()] = i
                    clean_shard_temporaries(task.out_fs, task.output_path)  # the dead attempt's partial file
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    if task.attempt < max_attempts:
                        report.retries += 1
                        queue.appendleft(replace(task, attempt=task.attempt + 1))
                        progress.say(f"worker died on shard {task.shard.rel} (attempt {task.attempt}: {first}); "
                                     "retrying on the next free worker", always=True)
                    else:
                        report.failures.append((task.shard.rel, f"worker died {task.attempt} times: {first}"))
                        progress.say(f"shard failed: {task.shard.rel}: worker died {task.attempt} times", always=True)
                    continue
                except RayTaskError as e:
                    del active[gen]
                    progress.rollback(counted.get(i, 0))
                    cause = e.cause if getattr(e, "cause", None) is not None else e
                    if isinstance(cause, ModelUnavailableError):
                        raise cause from None  # every shard would fail the same way: stop now
                    msg = f"{type(cause).__name__}: {cause}"
                    report.failures.append((task.shard.rel, msg))
                    progress.say(f"shard failed: {task.shard.rel}: {msg}", always=True)
                    submit(i)
                    continue
                if isinstance(ev, int):
                    counted[i] = counted.get(i, 0) + ev
                    progress.items(ev)
                else:
                    del active[gen]
                    try:
                        _landed(report, progress, finish, ev)
                    except Exception as e:  # noqa: BLE001 - assembling one shard failed: the others go on
                        report.failures.append((task.shard.rel, f"{type(e).__name__}: {e}"))
                        progress.say(f"shard failed: {task.shard.rel}: {type(e).__name__}: {e}", always=True)
                    submit(i)
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        for gen in list(active):
            try:
                ray.cancel(gen, force=False)
            except Exception:  # noqa: BLE001
                pass
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        if started:
            ray.shutdown()
    return report



# ---------------------------------------------------------------------------------------------
# The executor protocol: run units, report results; it knows no format


class Executor(Protocol):
    def run(self, tasks: list[ShardTask], spec: EngineSpec, opts: ProcessOptions, progress: Progress,
            finish: Finish | None = None) -> ExecReport: ...


@dataclass
class LocalExecutor:
    """Units one after another in this process (models cached per process)."""

    def run(self, tasks, spec, opts, progress, finish=None) -> ExecReport:
        return run_local(tasks, spec, opts, progress, finish=finish)


@dataclass
class RayExecutor:
    """Units over Ray actors, largest first, on a local instance or a cluster."""

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 1.0
    max_attempts: int = 3
    threads_per_worker: int | None = None

    def run(self, tasks, spec, opts, progress, finish=None) -> ExecReport:
        return run_ray(tasks, spec, opts, progress, address=self.address, workers=self.workers,
                       gpus_per_worker=self.gpus_per_worker, max_attempts=self.max_attempts, finish=finish,
                       threads_per_worker=self.threads_per_worker)
