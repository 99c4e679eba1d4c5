"""The same training under MirroredStrategy (two logical CPUs) and MultiWorkerMirroredStrategy
(two worker processes on localhost), compared with one device on the same tiny data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

# The tiny data's default (random) split: 2,400 training rows, the last 400 held out.
FLAGS = ["--cold-user-dropout", "0", "--cold-item-dropout", "0", "--holdout", "400",
         "--epochs", "4", "--embedding-dim", "16", "--id-dim", "16",
         "--side-dim", "4", "--hidden", "32", "--history-length", "32", "--batch-size", "128",
         "--learning-rate", "0.01"]
# Splits the CPU into two logical devices before TF starts, then runs the CLI.
TWO_CPUS = ("import sys, tensorflow as tf\n"
            "cpu = tf.config.list_physical_devices('CPU')[0]\n"
            "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
            "from serving import cli\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")


def _train(tiny_data_dir, run, strategy, env=None, code=None):
    command = [sys.executable, "-c", code or "import sys; from serving import cli; sys.exit(cli.main(sys.argv[1:]))",
               "train", "retrieval", "--data", str(tiny_data_dir), "--run", str(run),
               "--strategy", strategy, *FLAGS]
    return subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(process) -> None:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]


def _metrics(run):
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def single(tiny_data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("single")
    _finish(_train(tiny_data_dir, run, "default"))
    return _metrics(run)


def _close(a: dict, b: dict) -> None:
    # In-batch softmax sees half the batch per replica, so results are near, not equal.
    for key in ("hit_rate@10", "hit_rate@100"):
        assert abs(a["validation"][key] - b["validation"][key]) <= 0.05, (key, a["validation"], b["validation"])
    assert b["training"]["loss"][-1] < b["training"]["loss"][0]


def test_mirrored_strategy_on_two_logical_cpus(single, tiny_data_dir, tmp_path):
    _finish(_train(tiny_data_dir, tmp_path / "run", "mirrored", code=TWO_CPUS))
    mirrored = _metrics(tmp_path / "run")
    assert mirrored["training"]["replicas"] == 2
    _close(single, mirrored)


def test_multi_worker_strategy_with_two_processes(single, tiny_data_dir, tmp_path):
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workers = [_train(tiny_data_dir, tmp_path / "run", "multiworker",
                      env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
               for i in range(2)]
    for worker in workers:
        _finish(worker)
    chief = _metrics(tmp_path / "run")
    assert chief["training"]["replicas"] == 2
    _close(single, chief)
    assert (tmp_path / "run" / "checkpoints" / "final.index").exists()
    assert not list((tmp_path / "run").glob(".worker-*"))  # the other worker cleaned up


def test_multiworker_without_tf_config_is_a_clear_error(tiny_data_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    result = subprocess.run([sys.executable, "-m", "serving.cli", "train", "retrieval", "--data",
                             str(tiny_data_dir), "--run", str(tmp_path), "--strategy", "multiworker"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "needs TF_CONFIG" in result.stderr
