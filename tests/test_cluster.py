"""Real clusters: bit-identical factors in-process, on 1 and 2 worker processes, and on a
`dask scheduler` + `dask worker` cluster started on loopback; the default demo end to end."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env, model_bytes

from funkflow.pipeline.app.stages import run_pipeline

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

_factors = model_bytes


def _assert_bit_identical(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    assert a.keys() == b.keys() and a, "the same block files"
    for name in a:
        assert a[name] == b[name], f"{name} differs"


@pytest.fixture(scope="module")
def in_process_run(tiny_config, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("inprocess") / "run"
    run_pipeline(tiny_config(run_dir, "train.d=4"))
    return run_dir


def test_two_worker_local_cluster_matches_in_process(tiny_config, in_process_run, local_cluster, tmp_path):
    address = local_cluster.scheduler_address
    run_pipeline(tiny_config(tmp_path / "run", "train.d=4", f"cluster.scheduler={address}"))
    _assert_bit_identical(_factors(tmp_path / "run"), _factors(in_process_run))


def test_one_single_threaded_worker_matches_in_process(tiny_config, in_process_run, tmp_path):
    run_pipeline(tiny_config(tmp_path / "run", "train.d=4", "cluster.scheduler=local", "cluster.n_workers=1",
                             "cluster.threads_per_worker=1"))
    _assert_bit_identical(_factors(tmp_path / "run"), _factors(in_process_run))


def test_a_worker_with_two_threads_matches_in_process(tiny_config, in_process_run, tmp_path):
    """`dask worker` gives one process all cores by default: its blocks of a stratum run on its threads."""
    run_pipeline(tiny_config(tmp_path / "run", "train.d=4", "cluster.scheduler=local", "cluster.n_workers=1",
                             "cluster.threads_per_worker=2"))
    _assert_bit_identical(_factors(tmp_path / "run"), _factors(in_process_run))


def test_the_default_config_gives_the_same_bits_in_process_and_on_one_or_three_workers(tiny_config, tmp_path):
    """train.d: auto follows the data alone, so the default needs no pinned d to give the same model on any
    cluster: in this process on its threads, on one single-thread worker, and on three."""
    sets = ["train.d=auto", "data.generate.n_users=2000", "data.generate.n_items=500",
            "data.generate.n_ratings=320000", "train.epochs=3"]  # auto: d=4, blocks of 20k ratings
    shapes = {"inprocess": ["cluster.scheduler=inprocess"],
              "one": ["cluster.scheduler=local", "cluster.n_workers=1", "cluster.threads_per_worker=1"],
              "three": ["cluster.scheduler=local", "cluster.n_workers=3", "cluster.threads_per_worker=1"]}
    runs = {name: run_pipeline(tiny_config(tmp_path / name, *sets, *shape)) for name, shape in shapes.items()}
    assert {summary["d"] for summary in runs.values()} == {4}
    for name in ("one", "three"):
        _assert_bit_identical(_factors(tmp_path / name), _factors(tmp_path / "inprocess"))


def test_different_d_gives_different_factors(tiny_config, in_process_run, tmp_path):
    """The bit-identity above is not vacuous: the schedule does change the result."""
    run_pipeline(tiny_config(tmp_path / "run", "train.d=2"))
    assert _factors(tmp_path / "run") != _factors(in_process_run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _dask_cli_cluster(tmp_path: Path, protocol: str = "tcp", tls: list[str] = (),
                      security=None, cwd: Path | None = None,
                      processes: dict[str, subprocess.Popen] | None = None) -> Iterator[tuple[str, Path]]:
    """Start `dask scheduler` and two `dask worker` processes on 127.0.0.1 (in ``cwd``, if given); yield the
    address and the scheduler file. ``processes`` gets them by name (scheduler, worker0, worker1)."""
    from distributed import Client

    dask = str(Path(sys.executable).parent / "dask")
    port = str(_free_port())
    address = f"{protocol}://127.0.0.1:{port}"
    scheduler_file = tmp_path / "scheduler.json"
    commands = {"scheduler": [dask, "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard",
                              "--protocol", protocol, "--scheduler-file", str(scheduler_file), *tls]}
    for i in range(2):
        commands[f"worker{i}"] = [dask, "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                                  "--no-dashboard", "--name", f"w{i}", "--local-directory", str(tmp_path / f"w{i}"),
                                  *tls]
    with contextlib.ExitStack() as stack:
        for name, command in commands.items():
            log = stack.enter_context(open(tmp_path / f"{name}.log", "w"))
            env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING": "False"}  # as README says
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
            if processes is not None:
                processes[name] = proc
            stack.callback(proc.wait, timeout=30)
            stack.callback(proc.terminate)
        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(address, timeout="5s", security=security) as client:
                    client.wait_for_workers(2, timeout=60)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield address, scheduler_file


@pytest.fixture
def dask_cli_cluster(tmp_path):
    """A real `dask scheduler` and two `dask worker` processes on 127.0.0.1."""
    with _dask_cli_cluster(tmp_path) as (address, _):
        yield address


def test_cli_on_dask_scheduler_and_workers_matches_in_process(in_process_run, dask_cli_cluster, tmp_path):
    overrides = ["data.generate.n_users=300", "data.generate.n_items=120", "data.generate.n_ratings=12000",
                 "data.generate.max_user_fraction=0.5", "data.generate.ratings_per_part=5000", "model.k=8",
                 "train.epochs=4", "train.d=4"]
    cmd = [sys.executable, "-m", "funkflow", "run", "--scheduler", dask_cli_cluster,
           "--run-dir", str(tmp_path / "run")]
    for o in overrides:
        cmd += ["--set", o]
    # From tmp_path: `python -m` puts the working directory first on sys.path, and the
    # suite tests the installed package, not the checkout.
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "test RMSE" in done.stdout
    _assert_bit_identical(_factors(tmp_path / "run"), _factors(in_process_run))


def test_relative_paths_on_an_existing_cluster_are_the_drivers(tmp_path):
    """Workers started elsewhere resolve a relative path against their own working directory; the driver
    resolves every local path before it submits anything, so data and run directory are where it says."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "here").mkdir()
    rng = np.random.default_rng(1)
    rows = np.column_stack([rng.integers(1, 300, 6000), rng.integers(1, 100, 6000), rng.integers(1, 6, 6000)])
    np.savetxt(tmp_path / "here" / "ratings.csv", rows, fmt="%d", delimiter=",", header="user,item,rating",
               comments="")
    with _dask_cli_cluster(tmp_path, cwd=tmp_path / "elsewhere") as (address, _):
        done = subprocess.run([sys.executable, "-m", "funkflow", "run", "--scheduler", address, "--run-dir", "run",
                               "--set", "data.source=ratings.csv", "--set", "data.format=csv", "--set", "model.k=4",
                               "--set", "train.epochs=2", "--set", "train.d=2"],
                              cwd=tmp_path / "here", capture_output=True, text=True, timeout=240, env=cli_env())
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "here" / "run" / "blocks" / "blocks.json").is_file()
    assert not any((tmp_path / "elsewhere").rglob("blocks.json"))


def test_default_run_gets_within_five_percent_of_the_floor(tmp_path):
    """README's first command: `funkflow run` with no arguments, from a fresh directory."""
    env = cli_env()
    done = subprocess.run([sys.executable, "-m", "funkflow", "run"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "runs" / "default" / "summary.json").read_text())
    assert summary["test_rmse"] <= 1.05 * summary["floor_rmse"]
    assert "1,000,000 ratings, below 25,000,000: running in this process" in done.stderr
    assert "run directory: runs/default" in done.stdout


def test_small_data_run_in_process_unless_a_cluster_is_asked_for(tiny_config, in_process_run, tmp_path, caplog):
    """Below SMALL_RATINGS a LocalCluster costs more than it saves; `cluster.scheduler: local` starts one."""
    caplog.set_level("INFO", logger="funkflow")
    run_pipeline(tiny_config(tmp_path / "auto", "train.d=4", "cluster.scheduler=null"))
    assert "12,000 ratings, below 25,000,000: running in this process" in caplog.text
    assert "Dask dashboard" not in caplog.text
    caplog.clear()
    run_pipeline(tiny_config(tmp_path / "local", "train.d=4", "cluster.scheduler=local", "cluster.n_workers=2"))
    assert "Dask dashboard" in caplog.text and "running in this process" not in caplog.text
    _assert_bit_identical(_factors(tmp_path / "auto"), _factors(tmp_path / "local"))
    _assert_bit_identical(_factors(tmp_path / "auto"), _factors(in_process_run))


def test_scheduler_without_workers_exits_75(tmp_path, capsys):
    from distributed import LocalCluster

    from funkflow.pipeline.app.cli import main

    with LocalCluster(n_workers=0, processes=True, dashboard_address="127.0.0.1:0") as empty:
        code = main(["run", "--scheduler", empty.scheduler_address, "--set", "cluster.timeout=2",
                     "--run-dir", str(tmp_path / "run")])
    assert code == 75
    assert "fewer than 1 workers after cluster.timeout=2s" in capsys.readouterr().err


def test_only_item_factors_travel_between_workers_and_tasks_grow_with_workers(tiny_config, local_cluster, tmp_path):
    """Row blocks and user factors stay on their worker; item blocks go peer to peer through the
    exchange, not through Dask, each worker receiving about Q an epoch (no all-gather); the scheduler sees
    one task per worker and epoch, not d²."""
    from distributed import Client, get_task_stream

    from funkflow.pipeline.data.blocking import open_blocks
    from funkflow.pipeline.training.exchange import received_bytes
    from funkflow.tasks.hashing import SALT_COLUMNS, block_layout

    with Client(local_cluster) as client:
        address = local_cluster.scheduler_address
        config = tiny_config(tmp_path / "run", "train.d=8", "train.epochs=3", f"cluster.scheduler={address}")
        run_pipeline(config, last="block")
        client.run(lambda dask_worker: dask_worker.transfer_incoming_log.clear())
        before = {worker: len(entries) for worker, entries in client.run(received_bytes).items()}
        with get_task_stream(client) as stream:
            run_pipeline(config, last="train")
        logs = client.run(lambda dask_worker: list(dask_worker.transfer_incoming_log))
        by_worker = {worker: entries[before.get(worker, 0):] for worker, entries in client.run(received_bytes).items()}
        received = [entry for entries in by_worker.values() for entry in entries]
    moved = {key.split("-")[0] for log in logs.values() for entry in log for key in entry["keys"]}
    # make_true_model is the generate stage's true model, read by every chunk task.
    assert moved <= {"make_true_model"}, moved

    blocks = open_blocks(tmp_path / "run" / "blocks")
    item_sizes = {len(m) * (8 + 1) * 4 for m in block_layout(blocks.n_items, 8, blocks.seed, SALT_COLUMNS)[2]}
    assert received and {size for _, _, size in received} <= item_sizes
    q = blocks.n_items * (8 + 1) * 4
    for entries in by_worker.values():  # d - 1 blocks an epoch and about half the next epoch's start: 1.3 Q
        assert 0 < sum(size for _, _, size in entries) <= 1.5 * q * 3

    tasks = [t["key"].split("-")[0] for t in stream.data]
    assert tasks.count("epoch_share") == 2 * 3
    assert len(tasks) <= 2 * 3 + 4 * 2 + 8, tasks  # epochs, loading, collecting, the 8 row blocks


@pytest.mark.parametrize("n_workers,n_killed", [(2, 1), (1, 1), (2, 2)])
def test_worker_killed_mid_training_gives_the_same_bits(tiny_config, tmp_path, n_workers, n_killed):
    """Kill worker processes mid-run (one of two, the only one, or both, which their nannies restart): Dask
    rebuilds their row blocks from Parquet and their factor blocks from the last checkpoint, and the factors
    come out bit-identical."""
    import threading

    import dask
    from distributed import Client, LocalCluster

    from funkflow.pipeline.core.cluster import SCHEDULER_CONFIG

    sets = ["data.generate.n_users=2000", "data.generate.n_items=500", "data.generate.n_ratings=200000",
            "model.k=16", "train.epochs=8", "train.d=4"]
    run_pipeline(tiny_config(tmp_path / "whole", *sets))

    run_dir = tmp_path / "killed"
    killed = threading.Event()
    seen: dict[str, object] = {}
    with dask.config.set(SCHEDULER_CONFIG), LocalCluster(n_workers=n_workers, threads_per_worker=1,
                                                         dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        def kill_when_training() -> None:
            second = run_dir / "checkpoints" / "epoch-000002" / "manifest.json"
            deadline = time.monotonic() + 120
            while not second.exists() and time.monotonic() < deadline:
                time.sleep(0.005)
            victims = sorted(client.nthreads())[:n_killed]
            seen.update(victims=victims, model_existed=(run_dir / "model").exists())
            try:
                client.run(os._exit, 1, workers=victims)
            except Exception:  # the workers die before they can answer
                pass
            killed.set()

        killer = threading.Thread(target=kill_when_training, daemon=True)
        killer.start()
        run_pipeline(tiny_config(run_dir, *sets, f"cluster.scheduler={cluster.scheduler_address}"))
        killer.join(timeout=60)
        survivors = set(client.nthreads())
    assert killed.is_set() and seen["model_existed"] is False, "the kill must land mid-training"
    assert not set(seen["victims"]) & survivors
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    _assert_bit_identical(_factors(run_dir), _factors(tmp_path / "whole"))


def test_a_driver_killed_mid_epoch_frees_the_workers_of_an_existing_cluster(tiny_config, local_cluster, tmp_path):
    """kill -9 of the driver on a cluster that outlives it: the re-run on the same workers resumes from the
    last checkpoint to the same bits."""
    from conftest import kill_when

    sets = ["data.generate.n_users=2000", "data.generate.n_items=500", "data.generate.n_ratings=200000",
            "model.k=16", "train.epochs=8", "train.d=4"]
    run_pipeline(tiny_config(tmp_path / "whole", *sets))
    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "funkflow", "run", "--scheduler", local_cluster.scheduler_address,
               "--run-dir", str(run_dir)]
    for s in sets:
        command += ["--set", s]
    kill_when(command, tmp_path, lambda: (run_dir / "checkpoints" / "epoch-000002" / "manifest.json").exists())
    assert not (run_dir / "model").exists(), "the driver must die mid-training"
    run_pipeline(tiny_config(run_dir, *sets, f"cluster.scheduler={local_cluster.scheduler_address}"))
    _assert_bit_identical(_factors(run_dir), _factors(tmp_path / "whole"))


def test_an_epoch_task_whose_peer_never_comes_gives_its_thread_back_when_cancelled(planted_low_rank, local_cluster,
                                                                                  tmp_path):
    """A share waits for item blocks from its peers; if its client goes (the scheduler cancels the task)
    before a peer's share started, the wait notices and the worker's only thread is free again."""
    from distributed import Client

    from funkflow.pipeline.core.cluster import DaskExecutor, InProcessExecutor
    from funkflow.pipeline.core.config import SplitConfig
    from funkflow.pipeline.data.blocking import block_dataset
    from funkflow.pipeline.data.dataset import open_dataset
    from funkflow.pipeline.training.exchange import DSGDExchange, epoch_share, load_share
    from funkflow.tasks.blocks import load_row_block
    from funkflow.tasks.epoch import EpochPlan, StartFrom
    from funkflow.tasks.hashing import SALT_COLUMNS, SALT_ROWS, block_layout
    from funkflow.tasks.training import Hyper

    blocks = block_dataset(InProcessExecutor(), open_dataset(planted_low_rank), tmp_path / "blocks", 2, SplitConfig(),
                           seed=3)
    with Client(local_cluster) as client:
        executor = DaskExecutor(client)
        executor.register_worker_plugin(DSGDExchange())
        first, second = executor.workers
        row = client.submit(load_row_block, str(blocks.root), 0, 2, blocks.n_users, blocks.n_items, 3,
                            workers=[first])
        sizes = [tuple(len(m) for m in block_layout(n, 2, 3, salt)[2])
                 for n, salt in ((blocks.n_users, SALT_ROWS), (blocks.n_items, SALT_COLUMNS))]
        source = StartFrom(k=4, init_std=0.1, seed=0, user_sizes=sizes[0], item_sizes=sizes[1])
        client.submit(load_share, source, "t", "start", range(1), (0, 1), first, 0.0, False, row,
                      workers=[first]).result()
        plan = EpochPlan(train_id="t", run_id="r", epoch=0, ring=(0, 1), next_ring=(0, 1), seed=0,
                         workers=(first, second), hyper=Hyper(0.01, 0.02, 0.02, True, 3.0, "user_runs", 16, 8), k=4,
                         start="start", end="end")
        waiting = client.submit(epoch_share, plan, 0, 1, row, workers=[first], pure=False)
        time.sleep(1.0)
        assert waiting.status == "pending", "the share waits for the block its peer never sends"
        waiting.cancel()
        assert client.submit(sum, [1, 2], workers=[first], pure=False).result(timeout=10) == 3


def test_a_task_that_keeps_killing_its_workers_ends_in_a_cluster_error():
    """Past cluster.allowed_failures worker deaths under one task, the run ends with exit 75."""
    from funkflow.pipeline.core.cluster import open_executor
    from funkflow.pipeline.core.config import ClusterConfig
    from funkflow.pipeline.core.errors import EXIT_TEMPFAIL, ClusterError

    with open_executor(ClusterConfig(n_workers=1, allowed_failures=1, timeout=60)) as executor:
        doomed = executor.submit(os._exit, 1, name="kill_own_worker")
        with pytest.raises(ClusterError, match="cluster.allowed_failures") as caught:
            executor.gather([doomed])
        # The cluster itself survives: the nanny restarted the worker.
        assert executor.gather([executor.submit(sum, [1, 2], name="still_alive")]) == [3]
    assert caught.value.exit_code == EXIT_TEMPFAIL


def _certificates(folder: Path) -> dict[str, Path]:
    """A throw-away CA and one certificate for 127.0.0.1 signed by it (scheduler, workers and client share it)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "funkflow test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False).sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


TINY_SETS = ["data.generate.n_users=300", "data.generate.n_items=120", "data.generate.n_ratings=12000",
             "data.generate.max_user_fraction=0.5", "model.k=8", "train.epochs=2", "train.d=2"]


def test_tls_scheduler_by_scheduler_file_with_and_without_security(tmp_path):
    from distributed.security import Security

    certs = _certificates(tmp_path)
    tls = ["--tls-ca-file", str(certs["ca"]), "--tls-cert", str(certs["cert"]), "--tls-key", str(certs["key"])]
    security = Security(tls_ca_file=str(certs["ca"]), tls_client_cert=str(certs["cert"]),
                        tls_client_key=str(certs["key"]), require_encryption=True)
    base = [sys.executable, "-m", "funkflow", "run", *(a for s in TINY_SETS for a in ("--set", s))]
    with _dask_cli_cluster(tmp_path, "tls", tls, security) as (address, scheduler_file):
        bare = subprocess.run([*base, "--scheduler-file", str(scheduler_file), "--run-dir", str(tmp_path / "bare")],
                              cwd=tmp_path, capture_output=True, text=True, timeout=240)
        assert bare.returncode == 78
        assert f"the scheduler at {address} speaks TLS: set cluster.tls.ca_file" in bare.stderr
        secured = subprocess.run([*base, "--scheduler-file", str(scheduler_file), "--run-dir", str(tmp_path / "ok"),
                                  "--set", f"cluster.tls.ca_file={certs['ca']}",
                                  "--set", f"cluster.tls.cert={certs['cert']}",
                                  "--set", f"cluster.tls.key={certs['key']}"],
                                 cwd=tmp_path, capture_output=True, text=True, timeout=240)
        assert secured.returncode == 0, secured.stderr
        assert "test RMSE" in secured.stdout
        secure = [a for key, name in (("ca_file", "ca"), ("cert", "cert"), ("key", "key"))
                  for a in ("--set", f"cluster.tls.{key}={certs[name]}")]
        plain = subprocess.run([*base, "--scheduler", address.replace("tls://", "tcp://"), "--run-dir",
                                str(tmp_path / "plain"), *secure], cwd=tmp_path, capture_output=True, text=True,
                               timeout=240)
        assert plain.returncode == 78 and "Traceback" not in plain.stderr
        assert "cluster.tls is set but the scheduler address tcp://127.0.0.1:" in plain.stderr


def test_a_scheduler_lost_mid_run_exits_75_in_one_line_and_is_recorded(tmp_path):
    processes: dict[str, subprocess.Popen] = {}
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "funkflow", "run", "--run-dir", str(run_dir), "--set", "cluster.timeout=3",
               *(a for s in [*TINY_SETS, "train.epochs=100000", "train.early_stopping_patience=0"]
                 for a in ("--set", s))]
    with _dask_cli_cluster(tmp_path, processes=processes) as (address, _):
        run = subprocess.Popen([*command, "--scheduler", address], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "epoch-000002").is_dir() and time.monotonic() < deadline:
            time.sleep(0.1)
        processes["scheduler"].kill()
        _, err = run.communicate(timeout=120)
    assert run.returncode == 75, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("funkflow: error")] == [
        next(line for line in err.splitlines() if line.startswith(f"funkflow: error: lost the Dask scheduler at "
                                                                   f"{address}"))]
    record = json.loads((run_dir / "run.json").read_text())
    assert (record["status"], record["exit_code"]) == ("failed", 75)


def test_the_watch_never_reports_lost_a_worker_that_is_there(local_cluster, monkeypatch):
    """Under load the client's own refresh of its scheduler info answered with no workers (a third of the
    calls at this interval), and the driver once called an epoch off for 16 workers that were all there."""
    import dask
    from distributed import Client

    from funkflow.pipeline.core import cluster as cluster_module
    from funkflow.pipeline.core.cluster import DaskExecutor

    monkeypatch.setattr(cluster_module, "WATCH_SECONDS", 0.01)
    with dask.config.set({"distributed.client.scheduler-info-interval": "1ms"}), Client(local_cluster) as client:
        executor = DaskExecutor(client)
        futures = [executor.submit(time.sleep, 2, name="sleep", worker=w) for w in executor.workers]
        assert executor.gather_watching(futures) == [None, None]


def test_workers_with_other_versions_are_refused_naming_the_package(tiny_config, tmp_path):
    import importlib.metadata

    from distributed import Client, LocalCluster

    from funkflow.pipeline.core.errors import ConfigError

    def pretend_old_numba() -> None:
        real = importlib.metadata.version
        importlib.metadata.version = lambda name: "0.1.0" if name == "numba" else real(name)

    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as c:
        c.run(pretend_old_numba)
        config = tiny_config(tmp_path / "run", f"cluster.scheduler={cluster.scheduler_address}")
        with pytest.raises(ConfigError, match=r"numba 0\.1\.0, this client \d"):
            run_pipeline(config)


def test_report_writes_dasks_performance_report(tiny_config, local_cluster, tmp_path):
    report = tmp_path / "report.html"
    run_pipeline(tiny_config(tmp_path / "run", f"cluster.scheduler={local_cluster.scheduler_address}"),
                 report=report)
    html = report.read_text()
    assert "<html" in html.lower() and "Dask Performance Report" in html


def test_generate_on_a_cluster_shows_its_progress(local_cluster, tmp_path, caplog):
    from funkflow.pipeline.app.cli import main

    caplog.set_level("INFO", logger="funkflow")
    assert main(["generate", "--scale", "0.0005", "--out", str(tmp_path / "data"),
                 "--scheduler", local_cluster.scheduler_address]) == 0
    lines = [line for line in caplog.messages if line.startswith("generate: ") and " parts (" in line]
    assert lines and lines[-1].startswith("generate: ") and "(100%)" in lines[-1]
