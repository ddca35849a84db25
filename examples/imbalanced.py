"""Rare positives (the fraud-detection story): the same model without and with pos_weight.

Data: scikit-learn's bundled digits, task "is this digit an 8?". In the training split
the 8s are subsampled until they are 2% of the rows (about 20 positives against 970
negatives), as fraud is among transactions. The validation and test splits keep the
natural rate (about 10%), so that recall is measured on some 35 positives, not 7.

The model, loss and steps are ``binary_classifier``'s. Two runs on the same split, with
the same initialisation and batches: plain BCE, then BCE with
``pos_weight = n_negative / n_positive`` from ``jaxbce.pos_weight_from_labels``. At the
threshold ``sigmoid(logit) > 0.5`` the unweighted model misses most of the rare class;
weighting the positives buys back recall.

    python examples/imbalanced.py --out out/imbalanced
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
import trainlib
from binary_classifier import create_model, eval_step, train_step
from sklearn import metrics as skm
from sklearn.datasets import load_digits

import jaxbce


@dataclasses.dataclass(frozen=True)
class Config(trainlib.TrainConfig):
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    hidden: int = 64
    positive_digit: int = 8
    positive_fraction: float = 0.02


def load_data(config: Config) -> dict[str, trainlib.Split]:
    """Digits, positive = ``positive_digit``, positives made rare in the training split."""
    x, digit = load_digits(return_X_y=True)
    data = trainlib.split_standardize(x, (digit == config.positive_digit).astype(np.int32))
    train = data["train"]
    pos, neg = np.flatnonzero(train["y"] == 1), np.flatnonzero(train["y"] == 0)
    n_pos = round(config.positive_fraction / (1 - config.positive_fraction) * len(neg))
    keep = np.random.default_rng(trainlib.SPLIT_SEED).choice(pos, size=n_pos, replace=False)
    rows = np.sort(np.concatenate([neg, keep]))
    data["train"] = {name: arr[rows] for name, arr in train.items()}
    return data


def run(config: Config, dp, data, pos_weight, name: str, max_steps: int | None):
    """One training run; returns its history and test logits."""
    train = data["train"]
    model, optimizer = create_model(config, dp, train["x"].shape[1])
    step = functools.partial(train_step, pos_weight=pos_weight)
    evaluate = functools.partial(eval_step, pos_weight=pos_weight)
    history = trainlib.fit(
        config,
        dp,
        model,
        optimizer,
        step,
        evaluate,
        train,
        data["val"],
        metric=("pr_auc", skm.average_precision_score),
        desc=name,
        max_steps=max_steps,
    )
    _, logits = trainlib.evaluate(dp, evaluate, model, data["test"])
    return history, logits


def train_and_evaluate(config: Config, *, max_steps: int | None = None) -> dict[str, float]:
    dp = trainlib.DataParallel()
    data = load_data(config)
    train_y, test_y = data["train"]["y"], data["test"]["y"]
    pos_weight = jaxbce.pos_weight_from_labels(train_y)  # n_negative / n_positive
    runs = {
        "unweighted": run(config, dp, data, None, "unweighted", max_steps),
        "pos_weight": run(config, dp, data, dp.replicate(pos_weight), "pos_weight", max_steps),
    }
    metrics = {"train_positive_fraction": float(train_y.mean()), "pos_weight": float(pos_weight)}
    for name, (_, logits) in runs.items():
        m = trainlib.binary_metrics(test_y, logits)
        metrics |= {f"{name}_{k}": m[k] for k in ("recall", "precision", "f1", "pr_auc")}
    metrics["recall_gain"] = metrics["pos_weight_recall"] - metrics["unweighted_recall"]

    histories = {name: h for name, (h, _) in runs.items()}
    curves = {name: (test_y, logits) for name, (_, logits) in runs.items()}
    trainlib.write_outputs(config.out, metrics, histories, curves, config, dp)
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    config = trainlib.parse_config(Config, __doc__, argv)
    metrics = train_and_evaluate(config)
    trainlib.report("Imbalanced (rare positives), without and with pos_weight", metrics, config.out)
    return metrics


if __name__ == "__main__":
    main()
