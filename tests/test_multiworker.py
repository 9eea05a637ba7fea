"""MultiWorkerMirroredStrategy with the custom loop of clippy_monitor.monitor.distributed.

Two worker processes on localhost train a tiny model with ``train_distributed``;
a third process trains the same model on one device with the same global
batches.  Only the chief may write a record, and its statistics must equal the
single-device run's.  All three are subprocesses: TF allows one cluster (and,
in 2.21, one MirroredStrategy) per process, and conftest.py has already set up
this process's devices.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clippy_monitor.record import load_run
from clippy_monitor.record.format import META_FILE, RECORD_FILE

WORKER = Path(__file__).with_name("multiworker_worker.py")
DEADLINE_S = 240  # for all processes together; a hung collective fails here
STEPS, FLUSH_EVERY = 10, 5  # as in multiworker_worker.py
COMPARED_LAYER_METRICS = [
    "grad_norm",
    "weight_norm",
    "update_weight_linf",
    "clippy_factor",
    "applied_factor",
]
COMPARED_SERIES = ["loss", "grad_norm", "learning_rate"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_all(jobs: dict[str, dict[str, str]], workdir: Path) -> dict[str, str]:
    """Run ``WORKER logdir`` once per job (name -> extra env) at the same time; their outputs.

    Fails as soon as one fails (killing the others, which would wait forever
    for a dead peer) or when the deadline passes.
    """
    base_env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    base_env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    procs, logs = {}, {}
    for name, env in jobs.items():
        logs[name] = open(workdir / f"{name}.log", "w+")
        procs[name] = subprocess.Popen(
            [sys.executable, str(WORKER), str(workdir / name)],
            env={**base_env, **env},
            stdout=logs[name],
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + DEADLINE_S
    failed = None
    try:
        while failed is None and any(p.poll() is None for p in procs.values()):
            failed = next((n for n, p in procs.items() if p.poll() not in (None, 0)), None)
            if time.monotonic() > deadline:
                failed = "deadline"
            time.sleep(0.2)
        failed = failed or next((n for n, p in procs.items() if p.returncode != 0), None)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = {}
    for name, f in logs.items():
        f.seek(0)
        outputs[name] = f.read()
        f.close()
    if failed:
        dump = "\n".join(
            f"----- {n} (rc {procs[n].returncode})\n{out[-4000:]}" for n, out in outputs.items()
        )
        raise RuntimeError(f"{failed} failed (deadline {DEADLINE_S} s)\n{dump}")
    return outputs


def _tf_config(ports: list[int], index: int) -> str:
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The logdirs of worker0 (the chief), worker1 and the single-device reference."""
    for attempt in range(2):  # the free ports may be taken before the workers bind them
        workdir = tmp_path_factory.mktemp("multiworker")
        ports = [_free_port(), _free_port()]
        jobs = {f"worker{i}": {"TF_CONFIG": _tf_config(ports, i)} for i in range(2)}
        jobs["reference"] = {}
        try:
            outputs = _run_all(jobs, workdir)
            break
        except RuntimeError as error:
            text = str(error).lower()
            if attempt or not (
                "address already in use" in text or "could not start grpc server" in text
            ):
                raise
    for name in ("worker0", "worker1"):
        assert "DONE 2" in outputs[name], outputs[name][-2000:]
    assert "DONE 1" in outputs["reference"], outputs["reference"][-2000:]
    return {name: workdir / name for name in jobs}


def test_only_the_chief_writes(runs) -> None:
    chief, other = runs["worker0"], runs["worker1"]
    assert (chief / META_FILE).exists() and (chief / RECORD_FILE).exists()
    assert not other.exists() or not any(other.iterdir()), sorted(p.name for p in other.iterdir())


def test_chief_record_equals_single_device_run(runs) -> None:
    chief, reference = load_run(runs["worker0"]), load_run(runs["reference"])
    assert not chief.skipped
    np.testing.assert_array_equal(chief.steps, np.arange(STEPS))
    assert [c.n_steps for c in chief.chunks] == [FLUSH_EVERY] * (STEPS // FLUSH_EVERY)
    np.testing.assert_array_equal(reference.steps, chief.steps)
    assert chief.layers == reference.layers
    for metric in COMPARED_LAYER_METRICS:
        np.testing.assert_allclose(
            chief.layer(metric), reference.layer(metric), rtol=1e-5, err_msg=metric
        )
    for name in COMPARED_SERIES:
        np.testing.assert_allclose(
            chief.series(name), reference.series(name), rtol=1e-5, err_msg=name
        )
    # The comparison means something: Clippy clipped, and training moved the loss.
    assert chief.layer("clippy_factor").min() < 0.5
    assert chief.series("loss")[-1] < 0.5 * chief.series("loss")[0]


@pytest.mark.parametrize(
    "jobs, task_type, task_id, chief",
    [
        ({"worker": 2}, "worker", 0, True),
        ({"worker": 2}, "worker", 1, False),
        ({"chief": 1, "worker": 2}, "chief", 0, True),
        ({"chief": 1, "worker": 2}, "worker", 0, False),
        ({"worker": 2, "evaluator": 1}, "evaluator", 0, False),
        ({}, None, None, True),  # no cluster: a single process
    ],
)
def test_is_chief(jobs, task_type, task_id, chief) -> None:
    import types

    import tensorflow as tf

    from clippy_monitor.monitor.callback import _is_chief

    spec = tf.train.ClusterSpec(
        {job: [f"localhost:{1000 + i}" for i in range(n)] for job, n in jobs.items()}
    )
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        spec, task_type=task_type, task_id=task_id
    )
    assert _is_chief(types.SimpleNamespace(cluster_resolver=resolver)) is chief
    assert _is_chief(tf.distribute.get_strategy()) is True  # no cluster_resolver
