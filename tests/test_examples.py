"""The Flax example trainers: smoke tests, then the quality each one promises.

The examples are scripts in ``examples/`` that import each other as top-level modules;
they are imported here the same way, from that directory.
"""

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.standard_promotion

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"  # on sys.path (conftest.py)

trainlib = importlib.import_module("trainlib")
binary_classifier = importlib.import_module("binary_classifier")
multilabel_classifier = importlib.import_module("multilabel_classifier")
imbalanced = importlib.import_module("imbalanced")
stability = importlib.import_module("stability")
examples_main = importlib.import_module("main")

PLOTS = ("loss.png", "roc.png", "pr.png")


def assert_plain_floats(metrics):
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        assert all(type(v) is float and math.isfinite(v) for v in values), (key, value)


# ------------------------------------------------------------------------ building blocks


def test_shuffled_batches_cover_every_row_once_with_padding_masked():
    rng = np.random.default_rng(0)
    batches = list(trainlib.shuffled_batches(10, 4, rng))
    assert [len(idx) for idx, _ in batches] == [4, 4, 4]
    rows = np.concatenate([idx[mask] for idx, mask in batches])
    np.testing.assert_array_equal(np.sort(rows), np.arange(10))
    np.testing.assert_array_equal(batches[-1][1], [True, True, False, False])


def test_evaluate_padding_does_not_change_the_loss():
    """An odd-sized split is padded for the devices; the mask keeps the mean exact."""
    dp = trainlib.DataParallel()
    config = binary_classifier.Config(hidden=8)
    model, _ = binary_classifier.create_model(config, dp, in_features=3)
    rng = np.random.default_rng(1)
    split = {"x": rng.normal(size=(7, 3)).astype(np.float32), "y": np.arange(7) % 2}
    loss, logits = trainlib.evaluate(dp, binary_classifier.eval_step, model, split)
    assert logits.shape == (7,)
    expected = np.mean(np.logaddexp(0, logits) - split["y"] * logits)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)

    padded = {k: np.concatenate([v, v[:3]]) for k, v in split.items()}
    mask = np.arange(10) < 7
    loss_padded, _ = binary_classifier.eval_step(model, dp.put_batch(padded, np.arange(10), mask))
    np.testing.assert_allclose(float(loss_padded), loss, rtol=1e-6)


def test_splits_are_standardised_on_the_training_split_only():
    data = binary_classifier.load_data()
    np.testing.assert_allclose(data["train"]["x"].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(data["train"]["x"].std(0), 1, atol=1e-4)
    assert abs(data["test"]["x"].mean()) > 1e-4
    sizes = [len(data[s]["y"]) for s in ("train", "val", "test")]
    assert sizes == [341, 114, 114]


def test_multilabel_missing_labels_hidden_in_training_split_only():
    data = multilabel_classifier.load_data(missing_fraction=0.3, seed=0)
    hidden = data["train"]["y"] == multilabel_classifier.MISSING
    assert data["train"]["y"].shape[1] == len(multilabel_classifier.TAGS) >= 5
    assert 0.27 < hidden.mean() < 0.33
    assert not (data["test"]["y"] == multilabel_classifier.MISSING).any()


def test_imbalanced_training_positives_are_about_two_percent():
    data = imbalanced.load_data(imbalanced.Config())
    assert 0.015 < data["train"]["y"].mean() < 0.025
    assert data["test"]["y"].mean() > 0.05  # natural rate kept for evaluation


# --------------------------------------------------------------------------------- smoke


@pytest.mark.parametrize(
    "module", [binary_classifier, multilabel_classifier, imbalanced], ids=lambda m: m.__name__
)
def test_trainer_smoke(module, tmp_path):
    config = module.Config(epochs=1, quiet=True, out=str(tmp_path))
    metrics = module.train_and_evaluate(config, max_steps=3)
    assert_plain_floats(metrics)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["devices"] >= 1 and run["processes"] == 1
    for name in PLOTS:
        assert (tmp_path / name).stat().st_size > 0


def test_same_seed_same_result():
    config = binary_classifier.Config(epochs=2, quiet=True)
    first = binary_classifier.train_and_evaluate(config, max_steps=15)
    assert binary_classifier.train_and_evaluate(config, max_steps=15) == first


def test_cli_flags(tmp_path, capsys):
    argv = ["--epochs", "1", "--batch-size", "16", "--seed", "3", "--quiet", "--out", str(tmp_path)]
    metrics = binary_classifier.main(argv)
    config = json.loads((tmp_path / "run.json").read_text())["config"]
    assert (config["epochs"], config["batch_size"], config["seed"]) == (1, 16, 3)
    assert "test_accuracy" in capsys.readouterr().out
    assert set(metrics) >= {"test_accuracy", "test_roc_auc", "test_log_loss"}


# ------------------------------------------------------------------------------- quality


@pytest.mark.slow
def test_main_job_binary_default_quality(main_job):
    results, out = main_job
    m = results["binary"]
    assert_plain_floats(m)
    assert m["test_accuracy"] >= 0.96
    assert m["test_roc_auc"] >= 0.99
    assert m["test_log_loss"] < 0.15
    assert m["baseline_test_accuracy"] > 0.9 and m["baseline_test_roc_auc"] > 0.98
    for name in ("metrics.json", *PLOTS):
        assert (out / "binary" / name).exists()


@pytest.mark.slow
def test_main_job_multilabel_default_quality(main_job):
    results, out = main_job
    m = results["multilabel"]
    assert_plain_floats(m)
    assert m["micro_f1"] >= 0.97
    assert m["macro_f1"] >= 0.96
    assert m["subset_accuracy"] >= 0.9
    assert len(m["per_tag_roc_auc"]) == len(multilabel_classifier.TAGS)
    assert min(m["per_tag_roc_auc"]) >= 0.98
    assert 0.85 < m["baseline_micro_f1"] < m["micro_f1"]
    for name in ("metrics.json", *PLOTS):
        assert (out / "multilabel" / name).exists()


@pytest.mark.slow
def test_main_job_stability_picture(main_job):
    results, out = main_job
    s = results["stability"]
    assert s["naive_nonfinite_points"] > 0
    assert s["clamped_nonfinite_points"] == 0 and s["clamped_bad_fraction"] > 0.3
    assert s["jaxbce_nonfinite_points"] == 0 and s["jaxbce_bad_fraction"] == 0
    assert s["jaxbce_max_rel_err_loss"] < 1e-6 and s["jaxbce_max_rel_err_grad"] < 1e-6
    assert (out / "stability" / "stability.png").stat().st_size > 0


def test_readme_example_table_shows_what_the_main_job_prints():
    """Every row of the README's example table is a row the main job prints."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    if not readme.exists():
        pytest.skip("README.md is not next to the tests (installed-only layout)")
    section = readme.read_text().split("## Example results", 1)[1].split("\n## ", 1)[0]
    rows = [r.split("|")[1:-1] for r in section.splitlines() if r.startswith("| ")][1:]
    printed = {(task, row[2]) for task, row in _tasks()}
    assert rows and {(r[0].strip(), r[1].strip()) for r in rows} <= printed, rows


def _tasks():
    """(task of the row, or of the row above when blank; the row) for the main job's rows."""
    task = ""
    for row in examples_main.ROWS:
        task = row[1] or task
        yield task, row


def test_stability_table():
    text = stability.table()
    assert "inf" in text and "nan" in text


@pytest.mark.slow
def test_multilabel_with_30_percent_missing_labels_dense_and_sparse_targets(main_job):
    dense = main_job[0]["multilabel_missing"]
    config = multilabel_classifier.Config(missing_fraction=0.3, sparse_targets=True, quiet=True)
    sparse = multilabel_classifier.train_and_evaluate(config)
    for m in (dense, sparse):
        assert m["micro_f1"] >= 0.95
        assert m["missing_fraction"] == 0.3
    # the same loss from positive indices: the same training, up to float rounding
    assert abs(sparse["micro_f1"] - dense["micro_f1"]) <= 0.01


def test_sparse_targets_list_exactly_the_visible_positives():
    data = multilabel_classifier.load_data(missing_fraction=0.3, seed=0)
    split = multilabel_classifier.add_sparse_targets(data["train"])
    y, pos = split["y"], split["positives"]
    dense = np.zeros(y.shape, bool)
    rows = np.repeat(np.arange(len(y))[:, None], pos.shape[1], axis=1)
    dense[rows[pos >= 0], pos[pos >= 0]] = True
    np.testing.assert_array_equal(dense, y == 1)
    np.testing.assert_array_equal(split["visible"], y != multilabel_classifier.MISSING)


@pytest.mark.slow
def test_imbalanced_pos_weight_gains_recall(main_job):
    m = main_job[0]["imbalanced"]
    assert_plain_floats(m)
    assert m["pos_weight"] > 30
    assert m["recall_gain"] == m["pos_weight_recall"] - m["unweighted_recall"]
    assert m["recall_gain"] >= 0.1
    assert m["pos_weight_f1"] > m["unweighted_f1"]
    assert m["pos_weight_pr_auc"] > 0.7
