"""The extreme multi-label example: its data, a smoke run, 8 devices against one, and
the quality it promises at its default settings (100,000 labels).

The example is a script in ``examples/`` importing ``trainlib`` as a top-level module;
it is imported here the same way, from that directory.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.standard_promotion  # optax and flax promote dtypes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"  # on sys.path (conftest.py)

extreme = importlib.import_module("extreme_multilabel")

# Small enough for seconds on a CPU, large enough to learn more than the label prior.
SMALL = {"num_labels": 8000, "samples": 4000, "epochs": 2, "quiet": True}
KEYS = ("num_labels", "precision_at_1", "precision_at_5", "baseline_precision_at_1")


def test_data_has_zipf_like_labels_carried_by_the_features():
    config = extreme.Config(num_labels=2000, samples=3000)
    data = extreme.make_data(config)
    assert [len(data[s]["y"]) for s in ("train", "val", "test")] == [2400, 300, 300]
    y = np.concatenate([data[s]["y"] for s in data])
    assert y.shape[1] == config.labels_per_sample and y.min() == extreme.PAD
    assert (y >= 0).any(axis=1).all()  # every sample has a label
    for row in y:  # no repeats within a sample
        labels = row[row >= 0]
        assert len(set(labels)) == len(labels)
    counts = np.sort(extreme.label_counts(y, config.num_labels))[::-1]
    assert counts[0] > 50 * max(np.median(counts), 1)  # a few common labels, a long tail
    # the same draw every time, whatever --seed
    again = extreme.make_data(extreme.Config(num_labels=2000, samples=3000, seed=7))
    np.testing.assert_array_equal(again["test"]["x"], data["test"]["x"])


def test_precision_at_k_counts_hits_among_the_labels():
    y = np.array([[3, 7, -1], [1, -1, -1]])
    top = np.array([[7, 2, 3, 0, 9], [5, 6, 8, 0, 1]])
    assert extreme.precision_at(top, y, 1) == 0.5
    assert extreme.precision_at(top, y, 5) == (2 + 1) / 2 / 5


def test_smoke_writes_metrics_and_figure(tmp_path):
    config = extreme.Config(**SMALL, out=str(tmp_path))
    metrics = extreme.train_and_evaluate(config, max_steps=3)
    assert set(KEYS) <= set(metrics)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["devices"] >= 1 and run["seconds"] > 0
    assert len(run["history"][""]["step_loss"]) == 3
    assert (tmp_path / "extreme_multilabel.png").stat().st_size > 0


@pytest.fixture(scope="module")
def one_device():
    with jax.numpy_dtype_promotion("standard"):  # the marker's setting, module-wide
        return extreme.train_and_evaluate(extreme.Config(**SMALL))


def test_learns_more_than_the_label_prior(one_device):
    m = one_device
    assert m["num_labels"] == SMALL["num_labels"]
    assert m["precision_at_1"] >= m["baseline_precision_at_1"] + 0.2, m
    assert m["precision_at_5"] > m["baseline_precision_at_5"], m


def test_eight_devices_split_the_classes_and_match_one_device(tmp_path, one_device):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    flags = ["--num-labels", "8000", "--samples", "4000", "--epochs", "2", "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / "extreme_multilabel.py"), *flags]
        + ["--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert json.loads((tmp_path / "run.json").read_text())["devices"] == 8
    # the same training up to the order of float32 sums: at most 2 of the 400 test
    # samples may change their top label
    for key in ("precision_at_1", "precision_at_5"):
        assert abs(metrics[key] - one_device[key]) <= 2 / 400, (key, metrics, one_device)
    assert metrics["baseline_precision_at_1"] == one_device["baseline_precision_at_1"]


@pytest.mark.slow
def test_default_settings_quality(main_job):
    results, out = main_job
    m = results["extreme"]
    assert m["num_labels"] >= 100_000
    assert m["precision_at_1"] >= 0.6 and m["precision_at_1"] >= 3 * m["baseline_precision_at_1"]
    assert m["precision_at_5"] >= 2 * m["baseline_precision_at_5"]
    assert (out / "extreme" / "extreme_multilabel.png").stat().st_size > 0
