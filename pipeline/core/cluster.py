"""Where tasks run: a Dask cluster (local or remote) or, for debugging and tests, this process.

Both executors offer the same small surface the stages use: ``submit`` with a
soft worker preference, ``gather``, the worker list, and the dashboard link.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from funkflow.pipeline.core.config import ClusterConfig
from funkflow.pipeline.core.errors import ClusterError, ConfigError, FunkflowError, WorkersLost
from funkflow.tasks.epoch import ShareAborted

log = logging.getLogger(__name__)

IN_PROCESS = "inprocess"
LOCAL = "local"
# Below this many ratings a run goes in-process (on threads) unless cluster.scheduler says otherwise: there a
# LocalCluster's start-up and round trips cost more than they give (docs/benchmarks.md, "Small data"). Larger
# data get a LocalCluster's worker that a nanny restarts, and its dashboard.
SMALL_RATINGS = 25_000_000

# Scheduler settings for the clusters funkflow starts. Work stealing would move the
# task that loads a row block to another worker; DSGD keeps row blocks put and
# balances load through d instead.
SCHEDULER_CONFIG = {"distributed.scheduler.work-stealing": False}
# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which turns glibc's adaptive mmap threshold
# off: every array over 128 KiB is then a fresh mapping whose pages fault in again, and numpy-heavy tasks
# (blocking, loading row blocks, evaluate) run several times slower. Workers funkflow starts take arrays up to
# 2 MiB from the heap, which keeps their pages; larger ones (factor blocks) are still mapped and given back
# when freed, so that a worker's memory follows what it holds.
WORKER_ENVIRONMENT = {"distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": 2 * 1024 * 1024}
# The Dask config of a LocalCluster funkflow starts (and of the tests' and benchmarks' own).
LOCAL_CLUSTER_CONFIG = {**SCHEDULER_CONFIG, **WORKER_ENVIRONMENT}
# How often the driver looks for lost workers while an epoch runs.
WATCH_SECONDS = 0.5
# How long the driver waits before asking again about workers that seemed lost.
CONFIRM_SECONDS = 1.0


class Done:
    """A finished in-process result, standing where a Dask future would."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _resolve(arg: Any) -> Any:
    if isinstance(arg, Done):
        return arg.value
    if isinstance(arg, concurrent.futures.Future):
        return arg.result()
    if isinstance(arg, list | tuple):
        return type(arg)(_resolve(a) for a in arg)
    return arg


class Executor(Protocol):
    """Where tasks run: this process (:class:`InProcessExecutor`) or a Dask cluster (:class:`DaskExecutor`).

    ``workers`` are the addresses a task can be pinned to (``[None]`` in-process); ``threads`` each one's
    thread count. Results of one ``gather`` come back in submission order, whatever order they end in.
    """

    workers: list[str | None]
    threads: dict[str | None, int]
    total_threads: int
    dashboard_link: str | None

    def submit(self, fn: Callable, *args: Any, name: str, worker: str | None = None, **kwargs: Any) -> Any: ...

    def gather(self, futures: Sequence[Any]) -> list[Any]: ...

    def gather_watching(self, futures: Sequence[Any]) -> list[Any]: ...

    def cancel(self, futures: Sequence[Any]) -> None: ...

    def run_everywhere(self, fn: Callable, *args: Any) -> None: ...

    def refresh(self) -> None: ...

    def register_worker_plugin(self, plugin: Any) -> None:
        """Install ``plugin`` (a ``distributed.WorkerPlugin``) on every worker, now and on workers that join
        later; in-process, on the executor itself, where its tasks find it (:func:`in_process_extension`)."""

    def watch(self, futures: Sequence[Any], report: Callable[[int, int], None]) -> None:
        """Call ``report(done, total)`` as the tasks end."""


# The InProcessExecutor whose task the calling thread runs: what a Dask task finds with get_worker().
_running = threading.local()


def in_process_extension(name: str) -> Any:
    """The extension ``name`` of the InProcessExecutor running the calling task, as a task on a Dask worker
    finds its worker's in ``worker.extensions``."""
    executor = getattr(_running, "executor", None)
    if executor is None or name not in executor.extensions:
        raise RuntimeError(f"no {name} here: the task does not run on an InProcessExecutor that installed it")
    return executor.extensions[name]


class InProcessExecutor:
    """Runs tasks in this process: each at once when it is submitted on one thread, else on a pool of
    ``threads`` threads; an epoch on ``threads`` threads.

    The pool takes tasks first come, first served, and a task's inputs are submitted before it, so they have
    started (on other threads) by the time it waits for them: no task waits on one queued behind it.
    """

    workers: list[str | None] = [None]
    dashboard_link: str | None = None

    def __init__(self, threads: int = 1) -> None:
        self.threads: dict[str | None, int] = {None: threads}
        self.total_threads = threads
        self.extensions: dict[str, Any] = {}  # by name, as a Dask worker's: the plugins registered here
        self._pool = (concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="funkflow-task")
                      if threads > 1 else None)

    def _call(self, fn: Callable, args: tuple, kwargs: dict[str, Any]) -> Any:
        outer = getattr(_running, "executor", None)
        _running.executor = self
        try:
            return fn(*(_resolve(a) for a in args), **{key: _resolve(value) for key, value in kwargs.items()})
        finally:
            _running.executor = outer

    def submit(self, fn: Callable, *args: Any, name: str, worker: str | None = None, **kwargs: Any) -> Any:
        if self._pool is None:
            return Done(self._call(fn, args, kwargs))
        return self._pool.submit(self._call, fn, args, kwargs)

    def gather(self, futures: Sequence[Any]) -> list[Any]:
        return [_resolve(f) for f in futures]

    def gather_watching(self, futures: Sequence[Any]) -> list[Any]:
        return self.gather(futures)

    def cancel(self, futures: Sequence[Any]) -> None:
        for f in futures:
            if isinstance(f, concurrent.futures.Future):
                f.cancel()

    def run_everywhere(self, fn: Callable, *args: Any) -> None:
        self._call(fn, args, {})

    def refresh(self) -> None:
        pass

    def register_worker_plugin(self, plugin: Any) -> None:
        self.extensions.setdefault(plugin.name, plugin)  # a second registration keeps the first, as on Dask

    def watch(self, futures: Sequence[Any], report: Callable[[int, int], None]) -> None:
        pending = [f for f in futures if isinstance(f, concurrent.futures.Future)]
        report(len(futures) - len(pending), len(futures))
        for done, _ in enumerate(concurrent.futures.as_completed(pending), start=len(futures) - len(pending) + 1):
            report(done, len(futures))

    def close(self) -> None:
        """Let the running tasks finish and drop the queued ones."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor:
    """Submits to a Dask ``Client``; row-block affinity is a soft preference."""

    def __init__(self, client: Any, timeout: float = 30.0) -> None:
        self.client = client
        self.timeout = timeout
        self.dashboard_link: str | None = client.dashboard_link
        self.refresh()

    def refresh(self) -> None:
        """Read the workers again (after some were lost). With none left, wait up to ``timeout`` seconds for
        one: a nanny restarts a worker process that died, and on one machine that is the only worker."""
        if not self.workers_now():
            with contextlib.suppress(TimeoutError):
                self.client.wait_for_workers(1, timeout=self.timeout)
        info = self.workers_now()
        self.workers: list[str | None] = [address for address in sorted(info)]
        self.threads: dict[str | None, int] = {address: n for address, n in info.items()}
        self.total_threads = sum(self.threads.values())

    def workers_now(self) -> dict[str, int]:
        """The scheduler's workers and their threads, asked now. Not ``Client.scheduler_info()``: the client's
        periodic refresh replaces the answer it returns with one that lists no workers, often enough under
        load (650 of 2,000 calls at a 1 ms refresh) that all workers once seemed lost mid-epoch."""
        return dict(self.client.nthreads())

    def register_worker_plugin(self, plugin: Any) -> None:
        # A second registration of the same name (another run on this cluster) keeps the running ones, if the
        # plugin says it is idempotent.
        self.client.register_plugin(plugin)

    def run_everywhere(self, fn: Callable, *args: Any) -> None:
        """``fn(*args, dask_worker=...)`` on every worker now, outside the task graph; a worker that
        cannot answer (it is being lost) is passed over."""
        self.client.run(fn, *args, on_error="return")

    def cancel(self, futures: Sequence[Any]) -> None:
        self.client.cancel(list(futures))

    def submit(self, fn: Callable, *args: Any, name: str, worker: str | None = None, **kwargs: Any) -> Any:
        # Unique keys: the same block is legitimately recomputed (e.g. after a rollback).
        placement = {} if worker is None else {"workers": [worker], "allow_other_workers": True}
        return self.client.submit(fn, *args, key=f"{name}-{uuid.uuid4().hex}", pure=False, **placement, **kwargs)

    def watch(self, futures: Sequence[Any], report: Callable[[int, int], None]) -> None:
        from distributed import as_completed

        for done, _ in enumerate(as_completed(list(futures)), start=1):
            report(done, len(futures))

    def gather(self, futures: Sequence[Any]) -> list[Any]:
        from distributed import KilledWorker
        from distributed.scheduler import NoValidWorkerError

        try:
            return self.client.gather(list(futures))
        except KilledWorker as exc:
            raise ClusterError(f"workers died under the same task more often than the retry budget allows "
                               f"(cluster.allowed_failures; on a running scheduler, its "
                               f"distributed.scheduler.allowed-failures): {exc}") from exc
        except NoValidWorkerError as exc:
            raise ClusterError(f"no worker was left to run the tasks: {exc}") from exc

    def gather_watching(self, futures: Sequence[Any]) -> list[Any]:
        """:meth:`gather` for tasks that wait on each other through the worker extension.

        If one of them fails, or a worker leaves, the others would wait forever: raise at once,
        :class:`WorkersLost` when workers were lost (the caller restarts the work), the task's
        own error otherwise.
        """
        from distributed import wait

        expected = set(self.workers)
        pending = list(futures)
        while pending:
            try:
                wait(pending, timeout=WATCH_SECONDS, return_when="FIRST_COMPLETED")
            except TimeoutError:  # no progress for a while: are the workers still there?
                lost = expected - set(self.workers_now())
                if lost:  # asked again: a worker that answers late under load is not lost
                    time.sleep(CONFIRM_SECONDS)
                    lost = expected - set(self.workers_now())
                if lost:
                    raise WorkersLost(f"lost worker(s) {', '.join(sorted(map(str, lost)))}") from None
            failed = [f for f in futures if f.status == "error"]
            if failed:
                exc = failed[0].exception()
                if isinstance(exc, ShareAborted):  # a task moved off a lost worker, or a peer unreachable
                    raise WorkersLost(str(exc))
                break
            pending = [f for f in pending if f.status == "pending"]
        return self.gather(futures)




def local_shape(cfg: ClusterConfig) -> tuple[int, int]:
    """Worker processes and threads a worker for this machine: by default one process with every core as a
    thread. The numba kernels release the GIL, and within one process item blocks pass between the threads
    by reference, where between processes each hand-off serialises a block (docs/benchmarks.md). Set one of
    the two and the other fills the cores."""
    cores = os.cpu_count() or 1
    workers, threads = cfg.n_workers, cfg.threads_per_worker
    if threads is None:
        return (workers or 1), max(1, cores // (workers or 1))
    return (workers or max(1, cores // threads)), threads


def dask_setup(worker: Any) -> None:
    """Preloaded into the worker processes of the LocalClusters funkflow starts: Ctrl-C in a terminal reaches
    the whole process group, and it is the driver's to handle (it closes the cluster). A worker that took it
    too would print a traceback per process."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def open_executor(cfg: ClusterConfig, n_ratings: int | None = None, estimated: bool = False) -> Iterator[Executor]:
    """Connect to ``cfg.scheduler``, start a LocalCluster (``local``), or run in-process (``inprocess``).

    Unset, the choice goes by size: in-process below ``SMALL_RATINGS`` ratings (``n_ratings``, when the
    caller knows it, or ``estimated`` from the files' sizes), a LocalCluster otherwise. Factors are the same
    bits either way for a given d.
    """
    automatic = cfg.scheduler is None and cfg.scheduler_file is None
    if cfg.scheduler == IN_PROCESS or (automatic and n_ratings is not None and n_ratings < SMALL_RATINGS):
        n_workers, threads_per_worker = local_shape(cfg)
        threads = n_workers * threads_per_worker
        if automatic:
            size = f"about {float(f'{n_ratings:.2g}'):,.0f} ratings (from the files' sizes)" if estimated \
                else f"{n_ratings:,} ratings"
            log.info("%s, below %s: running in this process on %d threads, no cluster "
                     "(cluster.scheduler: local starts one anyway)", size, f"{SMALL_RATINGS:,}", threads)
        executor = InProcessExecutor(threads)
        try:
            yield executor
        finally:
            executor.close()
        return

    import dask
    from distributed import Client, LocalCluster

    if cfg.scheduler in (None, LOCAL) and cfg.scheduler_file is None:
        n_workers, threads_per_worker = local_shape(cfg)
        # Tasks that no worker can run for cluster.timeout fail, and the run exits 75, rather than
        # hang; so does a task whose workers keep dying under it.
        budget = {"distributed.scheduler.no-workers-timeout": f"{cfg.timeout}s",
                  "distributed.scheduler.allowed-failures": cfg.allowed_failures}
        with dask.config.set({**LOCAL_CLUSTER_CONFIG, **budget}), LocalCluster(
            n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
            dashboard_address=cfg.dashboard, silence_logs=logging.WARNING, preload=[__name__],
        ) as cluster, Client(cluster) as client, _scheduler_watched(client, cluster.scheduler_address):
            yield DaskExecutor(client, cfg.timeout)
        return

    address = cfg.scheduler if cfg.scheduler_file is None else _address_in(cfg.scheduler_file)
    assert address is not None, "unset cluster.scheduler runs here or on a LocalCluster, above"
    security = _security(cfg, address)
    try:
        client = Client(address, timeout=f"{cfg.timeout}s", security=security)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {address} within cluster.timeout="
                           f"{cfg.timeout:g}s: {exc}") from exc
    with client, _scheduler_watched(client, address):
        wanted = cfg.n_workers or 1
        try:
            client.wait_for_workers(wanted, timeout=cfg.timeout)
        except TimeoutError as exc:
            raise ClusterError(f"the scheduler at {address} has fewer than {wanted} workers after "
                               f"cluster.timeout={cfg.timeout:g}s") from exc
        if cfg.check_versions:
            _check_versions(client)
        yield DaskExecutor(client, cfg.timeout)


@contextlib.contextmanager
def _scheduler_watched(client: Any, address: str) -> Iterator[None]:
    """An error raised because the scheduler went away (the client gives up reconnecting after
    ``cluster.timeout``) becomes a :class:`ClusterError`: a fault of the cluster, which a retry may mend."""
    try:
        yield
    except Exception as exc:
        if not isinstance(exc, FunkflowError) and client.status != "running":
            raise ClusterError(f"lost the Dask scheduler at {address} ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else 'no reply'})") from exc
        raise


def _address_in(scheduler_file: str) -> str:
    """The scheduler address in a ``--scheduler-file`` (as ``dask scheduler --scheduler-file`` writes)."""
    try:
        with open(scheduler_file, encoding="utf-8") as f:
            return str(json.load(f)["address"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cluster.scheduler_file: cannot read a scheduler address from {scheduler_file}: "
                          f"{exc}") from None


def _security(cfg: ClusterConfig, address: str) -> Any:
    """distributed's ``Security`` from ``cluster.tls``; a ``tls://`` address without it is a config error."""
    from distributed.security import Security

    tls = cfg.tls
    if tls.ca_file is not None and not address.startswith("tls://"):
        raise ConfigError(f"cluster.tls is set but the scheduler address {address} is not tls://: use its tls:// "
                          "address, or unset cluster.tls")
    if tls.ca_file is None:
        if address.startswith("tls://"):
            raise ConfigError(f"the scheduler at {address} speaks TLS: set cluster.tls.ca_file, cluster.tls.cert "
                              "and cluster.tls.key (the CA and this client's certificate and key)")
        return None
    for key in ("ca_file", "cert", "key"):
        if not Path(getattr(tls, key)).is_file():
            raise ConfigError(f"cluster.tls.{key}: no such file {getattr(tls, key)}")
    return Security(tls_ca_file=tls.ca_file, tls_client_cert=tls.cert, tls_client_key=tls.key,
                    require_encryption=True)


CHECKED_PACKAGES = ("funkflow", "dask", "numba")


def _check_versions(client: Any) -> None:
    """Workers must run the funkflow, dask and numba this client runs: a mismatch is a config error."""
    from importlib.metadata import version

    mismatches = []
    for package in CHECKED_PACKAGES:
        here = version(package)
        theirs = client.run(version, package, on_error="return")
        for worker, found in sorted(theirs.items()):
            found = found if isinstance(found, str) else "not installed"
            if found != here:
                mismatches.append(f"{worker}: {package} {found}, this client {here}")
    if mismatches:
        raise ConfigError("the workers run other versions than this client:\n  " + "\n  ".join(mismatches)
                          + "\ninstall the same versions on every worker (or set cluster.check_versions: false)")
