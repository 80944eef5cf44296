"""Training under `tf.distribute.MultiWorkerMirroredStrategy`: two worker processes on
127.0.0.1 (TF_CONFIG, free ports), each with half of the data, trained with `model.fit`.

Keras 3 (checked with Keras 3.15.1, TensorFlow 2.21) cannot run the plain recipe of its
own guides under this strategy (tensorflow/tensorflow#72388):

* `fit` on a model created inside the scope first calls `_maybe_symbolic_build`, which
  reduces the first (x, y) batch eagerly with `strategy.reduce`; that rejects the tuple
  of PerReplica values ("Attempt to convert a value (PerReplica:{...}) with an
  unsupported type ... to a Tensor").
* every step's logs go through `strategy.reduce("MEAN", v, axis=0)`, which rejects the
  scalar logs ("Invalid reduction dimension 0 for input with 0 dimensions").

worker.py avoids both with public API (model created outside the scope and built inside
it; `train_step` logs with a length-1 axis); `test_keras_recipe` records the plain
recipe's error and starts passing when Keras fixes it.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "worker.py")
TIMEOUT = 240  # seconds for both workers (two fresh TensorFlow processes on 2 cores)

pytestmark = pytest.mark.slow


def _free_ports(count):
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _run_workers(case, out_dir):
    """Runs worker.py `case` in two processes of one cluster; fails with their logs."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    processes = []
    try:
        for index in range(2):
            tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            env = {
                **os.environ,
                "TF_CONFIG": json.dumps(tf_config),
                "TF_CPP_MIN_LOG_LEVEL": "3",
                "CUDA_VISIBLE_DEVICES": "",
            }
            log = open(os.path.join(out_dir, f"{case}{index}.log"), "w")  # noqa: SIM115
            command = [sys.executable, WORKER, str(out_dir), case]
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            processes.append((process, log))
        # poll both: a worker that fails leaves the other waiting on a collective
        deadline = time.monotonic() + TIMEOUT
        while any(process.poll() is None for process, _ in processes):
            failed = [i for i, (process, _) in enumerate(processes) if process.poll()]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        codes = [process.poll() for process, _ in processes]
        for index in sorted(range(2), key=lambda i: codes[i] is None):  # failures first
            if codes[index] != 0:
                code = "no exit (stopped)" if codes[index] is None else f"exit {codes[index]}"
                pytest.fail(f"worker {index}: {code}:\n{_tail(out_dir, case, index)}")
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
            log.close()


def _tail(out_dir, case, index):
    with open(os.path.join(out_dir, f"{case}{index}.log")) as f:
        return f.read()[-4000:]


def _load_weights(path):
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


@pytest.fixture(scope="module")
def implicit_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("multiworker")
    _run_workers("implicit", out_dir)
    reports = []
    for index in range(2):
        with open(out_dir / f"worker{index}.json") as f:
            reports.append(json.load(f))
    return out_dir, reports


@pytest.mark.parametrize("name", ["deq", "qp"])
def test_loss_decreases_and_replicas_agree(implicit_run, name):
    out_dir, reports = implicit_run
    losses = [report[name]["history"]["loss"] for report in reports]
    # every worker logs the loss over both shards
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    assert losses[0][-1] < 0.8 * losses[0][0], losses[0]
    weights = [_load_weights(out_dir / f"{name}_worker{index}.npz") for index in range(2)]
    reference = _load_weights(out_dir / f"{name}_reference.npz")
    assert len(weights[0]) == len(reference) > 0
    for w0, w1, ref in zip(weights[0], weights[1], reference, strict=True):
        np.testing.assert_array_equal(w0, w1)  # the replicas hold one model
        # ... the model a single process trains on all the data (the global batch)
        np.testing.assert_allclose(w0, ref, rtol=1e-3, atol=1e-4)


def test_deq_solver_statistics_are_cross_replica(implicit_run):
    _, reports = implicit_run
    local = [report["deq"]["local_stats"] for report in reports]
    kinds = (
        "forward_iterations",
        "forward_residual",
        "forward_converged",
        "backward_iterations",
        "backward_residual",
    )
    assert sorted(local[0]) == sorted(f"deq_{kind}" for kind in kinds)
    # the two shards alone give different statistics ...
    assert local[0]["deq_forward_residual"] != pytest.approx(
        local[1]["deq_forward_residual"], rel=1e-2
    )
    for key in local[0]:
        logged = [report["deq"]["history"][key] for report in reports]
        # ... and every worker logs the same value: the mean over the replicas of the
        # first step, at the initial weights (forward statistics and the backward ones
        # assigned while the gradient is computed)
        np.testing.assert_allclose(logged[0], logged[1], rtol=1e-6, err_msg=key)
        expected = 0.5 * (local[0][key] + local[1][key])
        np.testing.assert_allclose(logged[0][0], expected, rtol=2e-2, atol=1e-7, err_msg=key)


def test_keras_recipe(tmp_path):
    """The plain Keras recipe (model built inside the scope, default `train_step`)."""
    _run_workers("keras_recipe", tmp_path)
    with open(tmp_path / "recipe0.json") as f:
        report = json.load(f)
    if "error" in report:
        known = "Attempt to convert a value (PerReplica"
        assert known in report["error"], report["traceback"]
        pytest.xfail(
            f"Keras {report['keras']} / TensorFlow {report['tensorflow']}: model.fit under "
            f"MultiWorkerMirroredStrategy fails in _maybe_symbolic_build: "
            f"{report['error'].splitlines()[0]}"
        )
    assert report["loss"][-1] < report["loss"][0], report
