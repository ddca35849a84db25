"""The example trainers on 8 devices and on 2 processes, as separate Python processes.

Both runs use a short breast-cancer configuration and must reach the default quality
thresholds and match an in-process single-device run of the same configuration.
"""

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"  # on sys.path (conftest.py)

binary_classifier = importlib.import_module("binary_classifier")

SHORT = {"epochs": 20, "learning_rate": 3e-3}
SHORT_FLAGS = ["--epochs", "20", "--learning-rate", "3e-3", "--quiet"]
TIMEOUT = 300


@pytest.fixture(scope="module")
def single_device():
    with jax.numpy_dtype_promotion("standard"):  # optax promotes implicitly
        return binary_classifier.train_and_evaluate(binary_classifier.Config(quiet=True, **SHORT))


def run_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return env | {"JAX_PLATFORMS": "cpu", "JAX_NUMPY_RANK_PROMOTION": "raise"} | extra


def command(out):
    script = str(EXAMPLES / "binary_classifier.py")
    return [sys.executable, "-W", "error", script, *SHORT_FLAGS, "--out", str(out)]


def check(out, reference, devices, processes):
    metrics = json.loads((out / "metrics.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert (run["devices"], run["processes"]) == (devices, processes)
    assert metrics["test_accuracy"] >= 0.96
    assert metrics["test_roc_auc"] >= 0.99
    for key in ("test_accuracy", "test_roc_auc", "test_log_loss"):
        assert abs(metrics[key] - reference[key]) <= 0.02, (key, metrics, reference)


@pytest.mark.slow
def test_eight_devices_same_quality(tmp_path, single_device):
    env = run_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        command(tmp_path), env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    check(tmp_path, single_device, devices=8, processes=1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together(tmp_path, single_device):
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for pid in range(2):
        flags = ["--coordinator-address", address, "--num-processes", "2", "--process-id", str(pid)]
        procs.append(
            subprocess.Popen(
                command(tmp_path / f"p{pid}") + flags,
                env=run_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (_, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr
    check(tmp_path / "p0", single_device, devices=2, processes=2)
    assert not (tmp_path / "p1").exists()  # only process 0 writes
    assert "test_accuracy" in outputs[0][0] and "test_accuracy" not in outputs[1][0]
