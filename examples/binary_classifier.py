"""Breast-cancer diagnosis: a Flax NNX MLP trained with jaxbce's BCE-with-logits.

Data: scikit-learn's bundled Wisconsin breast-cancer set (569 tumours, 30 features;
positive = malignant). Fixed stratified 60/20/20 split, standardised on the training
split. Compared with scikit-learn's ``LogisticRegression`` on the same split.

    python examples/binary_classifier.py --out out/binary
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
import optax
import trainlib
from flax import nnx
from sklearn import metrics as skm
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression

import jaxbce


@dataclasses.dataclass(frozen=True)
class Config(trainlib.TrainConfig):
    epochs: int = 80
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1.0  # decoupled (AdamW): each step shrinks weights by lr * wd
    hidden: int = 64


class MLP(nnx.Module):
    """``[B, features] -> [B, 1]`` logits (no sigmoid: the loss takes logits)."""

    def __init__(self, in_features: int, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(in_features, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.hidden(x)))


def loss_fn(model: MLP, batch: dict[str, jax.Array], pos_weight: jax.Array | None = None):
    """Mean BCE over the real rows of the batch (``where`` drops the padding)."""
    logits = model(batch["x"])[:, 0]  # [B, 1] -> [B]: jaxbce never broadcasts labels
    loss = jaxbce.binary_cross_entropy_with_logits(
        logits, batch["y"], pos_weight=pos_weight, where=batch["mask"]
    )
    return loss, logits


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, batch, pos_weight=None) -> jax.Array:
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, _), grads = grad_fn(model, batch, pos_weight)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_step(model: MLP, batch, pos_weight=None) -> tuple[jax.Array, jax.Array]:
    return loss_fn(model, batch, pos_weight)


def accuracy(labels: np.ndarray, logits: np.ndarray) -> float:
    return float(np.mean((trainlib.probabilities(logits) > 0.5) == labels))


def load_data() -> dict[str, trainlib.Split]:
    x, y = load_breast_cancer(return_X_y=True)
    return trainlib.split_standardize(x, (y == 0).astype(np.int32))  # 0 = malignant


def create_model(config: Config, dp: trainlib.DataParallel, in_features: int):
    """The model and its AdamW optimizer, replicated over the mesh."""
    model = MLP(in_features, config.hidden, rngs=nnx.Rngs(config.seed))
    tx = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    dp.replicate_state(model, optimizer)
    return model, optimizer


def train_and_evaluate(config: Config, *, max_steps: int | None = None) -> dict[str, float]:
    dp = trainlib.DataParallel()
    data = load_data()
    train, val, test = data["train"], data["val"], data["test"]
    model, optimizer = create_model(config, dp, train["x"].shape[1])
    history = trainlib.fit(
        config,
        dp,
        model,
        optimizer,
        train_step,
        eval_step,
        train,
        val,
        metric=("accuracy", accuracy),
        desc="breast cancer",
        max_steps=max_steps,
    )

    test_loss, logits = trainlib.evaluate(dp, eval_step, model, test)
    ours = trainlib.binary_metrics(test["y"], logits)
    baseline = LogisticRegression(max_iter=5000).fit(train["x"], train["y"])
    base_scores = baseline.decision_function(test["x"])
    metrics = {
        "test_accuracy": ours["accuracy"],
        "test_roc_auc": ours["roc_auc"],
        "test_log_loss": test_loss,
        "baseline_test_accuracy": float(baseline.score(test["x"], test["y"])),
        "baseline_test_roc_auc": float(skm.roc_auc_score(test["y"], base_scores)),
    }
    curves = {"jaxbce MLP": (test["y"], logits), "LogisticRegression": (test["y"], base_scores)}
    trainlib.write_outputs(config.out, metrics, {"": history}, curves, config, dp)
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    config = trainlib.parse_config(Config, __doc__, argv)
    metrics = train_and_evaluate(config)
    trainlib.report("Breast cancer (binary)", metrics, config.out)
    return metrics


if __name__ == "__main__":
    main()
