"""Distributed tuning with keras-tuner's own mechanism: a chief oracle over gRPC on
127.0.0.1 and two workers, each descending from its own starting point."""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("grpc")

import keras_implicit.tuner as kit

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "tuner_dist_script.py")
TIMEOUT = 300  # seconds for the whole search (a loaded 2-core machine); then killed


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(tuner_id, port, directory, max_trials, log_dir):
    env = dict(os.environ)
    env.update(
        KERASTUNER_TUNER_ID=tuner_id,
        KERASTUNER_ORACLE_IP="127.0.0.1",
        KERASTUNER_ORACLE_PORT=str(port),
        TF_CPP_MIN_LOG_LEVEL="3",
        CUDA_VISIBLE_DEVICES="",
    )
    log = open(os.path.join(log_dir, f"{tuner_id}.log"), "w")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, SCRIPT, str(directory), str(max_trials)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return process, log


def _tail(log_dir, tuner_id):
    with open(os.path.join(log_dir, f"{tuner_id}.log")) as f:
        return f.read()[-3000:]


# Three fresh TensorFlow processes on two cores take about a minute to import.
@pytest.mark.slow
def test_chief_and_two_workers_keep_the_best_chain(tmp_path):
    port = _free_port()
    directory = tmp_path / "search"
    max_trials = 12
    processes = []
    try:
        processes.append(_start("chief", port, directory, max_trials, tmp_path))
        for worker in ("worker0", "worker1"):
            processes.append(_start(worker, port, directory, max_trials, tmp_path))
        deadline = time.monotonic() + TIMEOUT
        for (process, _), name in zip(processes[1:], ("worker0", "worker1"), strict=True):
            remaining = max(deadline - time.monotonic(), 1.0)
            try:
                code = process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not finish in {TIMEOUT} s:\n{_tail(tmp_path, name)}")
            assert code == 0, _tail(tmp_path, name)
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
            log.close()

    # The chief saved its oracle after every trial: reload it and inspect the chains.
    oracle = kit.HypergradientOracle()
    oracle._set_project_dir(str(directory), "distributed")
    oracle.reload()
    chains = oracle.chain_summary()
    assert set(chains) == {"worker0", "worker1"}, chains
    assert all(chain["n_trials"] >= 2 for chain in chains.values()), chains
    starts = [oracle._chains[w]["start"][0] for w in ("worker0", "worker1")]
    assert abs(starts[0] - starts[1]) > 0.5, starts  # different starting points
    completed = [t for t in oracle.trials.values() if t.status == "COMPLETED"]
    assert 4 <= len(completed) <= max_trials
    best = oracle.get_best_trials(1)[0]
    assert best.score == pytest.approx(min(t.score for t in completed))
    assert best.score == pytest.approx(min(c["best_value"] for c in chains.values()))
    assert np.isfinite(best.score)
