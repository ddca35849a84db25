"""Multi-label tagging of handwritten digits, with missing labels, on jaxbce.

Data: scikit-learn's bundled digits (1797 8x8 images). Each image gets six tags derived
from its digit (even, prime, greater than 4, multiple of 3, closed loop, perfect
square): six binary problems sharing one network, ``[B, 6]`` logits against ``[B, 6]``
labels. ``pos_weight`` per tag is ``n_negative / n_positive`` of the training labels.

``--missing-fraction F`` hides that fraction of the training labels (label -1); the loss
skips them with ``ignore_index=-1`` and skips batch padding with ``where``, so a hidden
label costs nothing and contributes no gradient. Compared with one logistic regression
per tag (one-vs-rest) on the same split and the same visible labels.

``--sparse-targets`` trains through ``jaxbce.sparse_binary_cross_entropy_with_logits``:
the loss reads each image's positive tags as a padded index list ``[B, tags]`` (-1 =
none) instead of the dense 0/1 labels, the form that pays off with thousands of tags.
Hidden labels then need a visibility mask in ``where``.

    python examples/multilabel_classifier.py --out out/multilabel
    python examples/multilabel_classifier.py --missing-fraction 0.3
    python examples/multilabel_classifier.py --sparse-targets --missing-fraction 0.3
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import numpy as np
import optax
import trainlib
from flax import nnx
from sklearn import metrics as skm
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

import jaxbce

TAGS = {
    "even": (0, 2, 4, 6, 8),
    "prime": (2, 3, 5, 7),
    "greater_than_4": (5, 6, 7, 8, 9),
    "multiple_of_3": (0, 3, 6, 9),
    "closed_loop": (0, 6, 8, 9),  # as handwritten here, 4 is mostly open
    "perfect_square": (0, 1, 4, 9),
}
MISSING = -1


@dataclasses.dataclass(frozen=True)
class Config(trainlib.TrainConfig):
    epochs: int = 60
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1.0  # decoupled (AdamW): each step shrinks weights by lr * wd
    hidden: int = 256
    missing_fraction: float = 0.0
    sparse_targets: bool = False


class MLP(nnx.Module):
    """``[B, 64]`` pixels -> ``[B, tags]`` logits, one per tag."""

    def __init__(self, in_features: int, hidden: int, num_tags: int, *, rngs: nnx.Rngs):
        self.layer1 = nnx.Linear(in_features, hidden, rngs=rngs)
        self.layer2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, num_tags, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.layer1(x))
        x = nnx.relu(self.layer2(x))
        return self.out(x)


def loss_fn(model: MLP, batch: dict[str, jax.Array], pos_weight: jax.Array):
    """Mean BCE over the visible labels of the real rows."""
    logits = model(batch["x"])
    if "positives" in batch:  # --sparse-targets: the same loss from positive indices
        loss = jaxbce.sparse_binary_cross_entropy_with_logits(
            logits,
            batch["positives"],  # [B, tags] tag indices, -1 = padding
            pos_weight=pos_weight,
            where=batch["mask"][:, None] & batch["visible"],  # padding rows, hidden labels
        )
        return loss, logits
    loss = jaxbce.binary_cross_entropy_with_logits(
        logits,
        batch["y"],
        pos_weight=pos_weight,  # [tags], broadcast over the batch
        where=batch["mask"][:, None],  # padding rows
        ignore_index=MISSING,  # hidden labels
    )
    return loss, logits


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, batch, pos_weight) -> jax.Array:
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, _), grads = grad_fn(model, batch, pos_weight)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_step(model: MLP, batch, pos_weight) -> tuple[jax.Array, jax.Array]:
    return loss_fn(model, batch, pos_weight)


def micro_f1(labels: np.ndarray, logits: np.ndarray) -> float:
    pred = trainlib.probabilities(logits) > 0.5
    return float(skm.f1_score(labels, pred, average="micro"))


def load_data(missing_fraction: float, seed: int) -> dict[str, trainlib.Split]:
    """Tags from the digits; ``missing_fraction`` of the training labels set to -1."""
    x, digit = load_digits(return_X_y=True)
    y = np.stack([np.isin(digit, d) for d in TAGS.values()], axis=1).astype(np.int32)
    data = trainlib.split_standardize(x, y, stratify=digit)
    train_y = data["train"]["y"]
    hidden = np.random.default_rng(seed).random(train_y.shape) < missing_fraction
    data["train"]["y"] = np.where(hidden, MISSING, train_y).astype(np.int32)
    return data


def add_sparse_targets(split: trainlib.Split) -> trainlib.Split:
    """Adds ``positives`` (each row's positive tags, padded with -1) and ``visible``."""
    y = split["y"]
    order = np.argsort(y != 1, axis=1, kind="stable")  # positive tags first
    positives = np.where(np.take_along_axis(y, order, axis=1) == 1, order, -1)
    return dict(split, positives=positives.astype(np.int32), visible=y != MISSING)


def baseline_scores(train: trainlib.Split, test_x: np.ndarray) -> np.ndarray:
    """One-vs-rest logistic regression, each tag fitted on its visible labels."""
    scores = []
    for t in range(train["y"].shape[1]):
        seen = train["y"][:, t] != MISSING
        lr = LogisticRegression(max_iter=5000).fit(train["x"][seen], train["y"][seen, t])
        scores.append(lr.decision_function(test_x))
    return np.stack(scores, axis=1)


def train_and_evaluate(config: Config, *, max_steps: int | None = None) -> dict:
    dp = trainlib.DataParallel()
    data = load_data(config.missing_fraction, config.seed)
    if config.sparse_targets:
        data = {name: add_sparse_targets(split) for name, split in data.items()}
    train, val, test = data["train"], data["val"], data["test"]
    pos_weight = dp.replicate(jaxbce.pos_weight_from_labels(train["y"], ignore_index=MISSING))

    model = MLP(train["x"].shape[1], config.hidden, len(TAGS), rngs=nnx.Rngs(config.seed))
    tx = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    dp.replicate_state(model, optimizer)
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
        val,
        metric=("micro_f1", micro_f1),
        desc="digit tags",
        max_steps=max_steps,
    )

    _, logits = trainlib.evaluate(dp, evaluate, model, test)
    y = test["y"]
    pred = trainlib.probabilities(logits) > 0.5
    base_pred = baseline_scores(train, test["x"]) > 0  # sigmoid(score) > 0.5
    metrics = {
        "micro_f1": float(skm.f1_score(y, pred, average="micro")),
        "macro_f1": float(skm.f1_score(y, pred, average="macro")),
        "subset_accuracy": float(skm.accuracy_score(y, pred)),
        "per_tag_roc_auc": [
            float(skm.roc_auc_score(y[:, t], logits[:, t])) for t in range(y.shape[1])
        ],
        "baseline_micro_f1": float(skm.f1_score(y, base_pred, average="micro")),
        "missing_fraction": float(config.missing_fraction),
        "sparse_targets": float(config.sparse_targets),
    }
    curves = {"micro-average": (y.ravel(), logits.ravel())}
    curves |= {tag: (y[:, t], logits[:, t]) for t, tag in enumerate(TAGS)}
    trainlib.write_outputs(config.out, metrics, {"": history}, curves, config, dp)
    return metrics


def main(argv: Sequence[str] | None = None) -> dict:
    config = trainlib.parse_config(Config, __doc__, argv)
    metrics = train_and_evaluate(config)
    trainlib.report(f"Digit tags (multi-label): {', '.join(TAGS)}", metrics, config.out)
    return metrics


if __name__ == "__main__":
    main()
