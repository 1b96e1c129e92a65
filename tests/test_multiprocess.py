"""Multi-process training: two ``jax.distributed`` processes on this machine (loopback
coordinator, 2 CPU devices each, gloo collectives) train the tiny model on a 4-device
``data`` 2 x ``fsdp`` 2 mesh, each feeding its own half of every global batch; their losses must
match a single-process run on the full batches. Plus the argument checks of
:func:`medusa_jax.distributed.maybe_initialize` and single-process batch assembly."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import mp_worker
import numpy as np
import pytest

from medusa_jax.distributed import DistributedError, global_batch_from_local, maybe_initialize
from medusa_jax.sharding import MeshConfig, ShardingError, make_mesh

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mp_worker.py")
NUM_PROCESSES, LOCAL_DEVICES = 2, 2
WORKER_TIMEOUT_S = 150  # the whole two-process run; it takes ~20-50 s on 2 busy cores

ENV_VARS = (
    "MEDUSA_COORDINATOR",
    "MEDUSA_NUM_PROCESSES",
    "MEDUSA_PROCESS_ID",
    "MEDUSA_LOCAL_DEVICE_COUNT",
    "MEDUSA_COORDINATOR_BIND",
    "MEDUSA_DISTRIBUTED",
    "JAX_COORDINATOR_ADDRESS",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    # LLVM optimisation level 0 compiles the workers' steps ~35% faster on CPU; it moves the
    # losses by ~1e-7 relative, far inside the tolerance.
    env["XLA_FLAGS"] = " ".join(
        [
            *flags,
            f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
            "--xla_backend_optimization_level=0",
        ]
    )
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_CPU_COLLECTIVES_IMPLEMENTATION", None)
    return env


def launch(tmp_path, attempt: int):
    """Start the workers; returns ``[(popen, out_json, log_path)]``."""
    coordinator = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(NUM_PROCESSES):
        out = tmp_path / f"a{attempt}_p{i}.json"
        log = tmp_path / f"a{attempt}_p{i}.log"
        cmd = [
            sys.executable,
            WORKER,
            f"--coordinator={coordinator}",
            f"--num-processes={NUM_PROCESSES}",
            f"--process-id={i}",
            f"--local-devices={LOCAL_DEVICES}",
            "--init-timeout=60",
            f"--out={out}",
        ]
        with open(log, "wb") as f:
            p = subprocess.Popen(cmd, env=worker_env(), stdout=f, stderr=subprocess.STDOUT)
        procs.append((p, out, log))
    return procs


def wait_all(procs, deadline: float) -> list[int | None]:
    """Exit codes (None: still running at the deadline, then killed). Kills every worker that
    is left when one fails, so a lone survivor cannot sit in a collective until the deadline."""
    codes: list[int | None] = [None] * len(procs)
    try:
        while time.monotonic() < deadline and None in codes:
            for i, (p, _, _) in enumerate(procs):
                codes[i] = p.poll()
            if any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
    finally:
        for p, _, _ in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
    return codes


def logs(procs) -> str:
    return "\n".join(
        f"--- process {i} (exit {p.returncode}) ---\n{log.read_text(errors='replace')[-4000:]}"
        for i, (p, _, log) in enumerate(procs)
    )


def scrub_env(monkeypatch):
    for k in ENV_VARS:
        monkeypatch.delenv(k, raising=False)


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
    for attempt in range(2):  # a second try only if the coordinator port was taken meanwhile
        start = time.monotonic()
        procs = launch(tmp_path, attempt)
        try:
            reference = mp_worker.run_steps()  # single process, full batches, while they run
        except BaseException:
            wait_all(procs, time.monotonic())  # kill them
            raise
        codes = wait_all(procs, start + WORKER_TIMEOUT_S)
        text = logs(procs)
        if codes == [0] * NUM_PROCESSES:
            break
        if attempt == 0 and "address already in use" in text.lower():
            continue
        pytest.fail(f"workers failed or timed out (exit codes {codes}):\n{text}")

    results = [json.loads(out.read_text()) for _, out, _ in procs]
    for i, r in enumerate(results):
        assert r["process_index"] == i and r["process_count"] == NUM_PROCESSES
        assert r["local_device_count"] == LOCAL_DEVICES
        assert r["device_count"] == NUM_PROCESSES * LOCAL_DEVICES
        assert r["mesh_shape"] == {"data": 2, "fsdp": 2, "tensor": 1}
        assert r["backend"] == "cpu" and r["cpu_collectives"] == "gloo"
        assert r["batches_match"], "the global batches assembled from the shards differ"
        for mode in mp_worker.MODES:
            assert len(r[mode]) == mp_worker.STEPS
            np.testing.assert_allclose(r[mode], reference[mode], rtol=1e-5, err_msg=mode)
    # The losses are replicated across processes: every process reads the same values.
    assert results[0]["medusa1"] == results[1]["medusa1"]
    assert results[0]["medusa2"] == results[1]["medusa2"]
    # Training moved: the steps are not no-ops.
    assert reference["medusa2"][0] != reference["medusa2"][1]


def test_no_configuration_is_single_process(monkeypatch):
    scrub_env(monkeypatch)
    info = maybe_initialize()
    assert not info.initialized and not info.started
    assert (info.process_index, info.process_count) == (0, 1)


@pytest.mark.parametrize(
    "kwargs, env, match",
    [
        (
            dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2),
            {},
            r"process_id=2 is out of range for num_processes=2 \(valid: 0..1\)",
        ),
        (
            dict(),
            {
                "MEDUSA_COORDINATOR": "127.0.0.1:1",
                "MEDUSA_NUM_PROCESSES": "2",
                "MEDUSA_PROCESS_ID": "5",
            },
            "process_id=5 is out of range",
        ),
        (dict(), {"MEDUSA_NUM_PROCESSES": "two"}, "MEDUSA_NUM_PROCESSES='two' is not an integer"),
        (dict(num_processes=0), {}, "num_processes must be an integer >= 1, got 0"),
        (dict(coordinator_address="localhost"), {}, "must look like host:port"),
        (dict(coordinator_address="127.0.0.1:1"), {}, "missing num_processes, process_id"),
        (
            dict(
                coordinator_address="127.0.0.1:1",
                num_processes=2,
                process_id=0,
                local_device_count=0,
            ),
            {},
            "local_device_count must be an integer >= 1",
        ),
    ],
)
def test_bad_settings_are_clear_errors(monkeypatch, kwargs, env, match):
    scrub_env(monkeypatch)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DistributedError, match=match):
        maybe_initialize(**kwargs)


def test_too_late_is_a_clear_error(monkeypatch):
    scrub_env(monkeypatch)
    jax.devices()  # the backend is up (as in any test process)
    with pytest.raises(DistributedError, match="must run before anything starts a jax backend"):
        maybe_initialize("127.0.0.1:1", 2, 0)
    with pytest.raises(DistributedError, match="local_device_count=2 must be set before"):
        maybe_initialize(local_device_count=2)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_global_batch_single_process():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    local = mp_worker.dataset()  # 24 rows: one process holds the whole batch
    batch = global_batch_from_local(local, mesh)
    for k, v in local.items():
        assert batch[k].shape == v.shape
        np.testing.assert_array_equal(np.asarray(batch[k]), v)
        assert batch[k].sharding.spec[0] == ("data", "fsdp")
    with pytest.raises(ValueError, match="share a leading"):
        global_batch_from_local({"a": np.zeros((4, 2)), "b": np.zeros((8, 2))}, mesh)
    with pytest.raises(ShardingError, match="does not split over this process's 4 row"):
        global_batch_from_local({"a": np.zeros((6, 2))}, mesh)
