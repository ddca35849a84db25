"""examples/siglip.py: captions, a smoke run, and the default run on 1 and 8 devices and
on 2 processes (the loss runs as a ring over whatever devices there are)."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.standard_promotion

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"  # on sys.path (conftest.py)

siglip = importlib.import_module("siglip")
# the helpers of the other trainers' multi-device tests (tests/ is on sys.path)
distributed = importlib.import_module("test_examples_distributed")
TIMEOUT = 300
KEYS = ("zero_shot_accuracy", "image_to_text_recall_at_1", "text_to_image_recall_at_1")


def test_captions_are_true_of_their_digit_and_prompts_tell_digits_apart():
    rng = np.random.default_rng(0)
    digits = np.arange(200) % 10
    tokens = siglip.sample_captions(digits, rng, 0.5, 0.7)
    assert np.all((tokens != siglip.PAD).sum(axis=1) >= 1)
    true = siglip.describes(tokens, digits)
    assert np.all(np.diag(true))  # every caption describes its own image
    assert not true.all()  # and not every other one
    prompts = siglip.prompts()
    np.testing.assert_array_equal(siglip.describes(prompts, np.arange(10)), np.eye(10, dtype=bool))
    words = [siglip.VOCAB[t] for t in prompts[7]]
    assert words == ["seven", "odd", "prime", "large", "open"]


def test_smoke(tmp_path):
    config = siglip.Config(epochs=1, quiet=True, out=str(tmp_path))
    metrics = siglip.train_and_evaluate(config, max_steps=3)
    assert set(metrics) >= set(KEYS) | {"devices"}
    assert all(0 <= metrics[k] <= 1 for k in KEYS)
    assert metrics["devices"] == jax.device_count()
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    history = json.loads((tmp_path / "run.json").read_text())["history"][""]
    assert set(history) == {"train_loss", "val_loss", "val_zero_shot_accuracy"}
    assert all(len(v) == 1 and np.isfinite(v[0]) for v in history.values())
    for name in ("siglip.png", "loss.png", "roc.png", "pr.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.fixture(scope="module")
def single_device(main_job):
    """The default run on one device: the main job's."""
    return main_job[0]["siglip"]


@pytest.mark.slow
def test_default_run_zero_shot_quality(single_device):
    m = single_device
    assert m["zero_shot_accuracy"] >= 0.9
    assert m["image_to_text_recall_at_1"] >= 0.9 and m["text_to_image_recall_at_1"] >= 0.9


def command(out, *flags):
    script = str(EXAMPLES / "siglip.py")
    return [sys.executable, "-W", "error", script, "--quiet", "--out", str(out), *flags]


def check(out, reference, devices, processes):
    metrics = json.loads((out / "metrics.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert (metrics["devices"], run["processes"]) == (devices, processes)
    assert metrics["zero_shot_accuracy"] >= 0.9
    for key in KEYS:  # the ring only reorders float sums
        assert abs(metrics[key] - reference[key]) <= 0.02, (key, metrics, reference)


@pytest.mark.slow
def test_eight_devices_same_accuracy(tmp_path, single_device):
    env = distributed.run_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        command(tmp_path), env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check(tmp_path, single_device, devices=8, processes=1)


@pytest.mark.slow
def test_two_processes_train_together(tmp_path, single_device):
    flags = ["--coordinator-address", f"127.0.0.1:{distributed.free_port()}"]
    flags += ["--num-processes", "2", "--process-id"]
    procs = [
        subprocess.Popen(
            command(tmp_path / f"p{pid}", *flags, str(pid)),
            env=distributed.run_env(),
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        for pid in range(2)
    ]
    try:
        errors = [proc.communicate(timeout=TIMEOUT)[1] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], [e[-3000:] for e in errors]
    check(tmp_path / "p0", single_device, devices=2, processes=2)
    assert not (tmp_path / "p1").exists()  # only process 0 writes
