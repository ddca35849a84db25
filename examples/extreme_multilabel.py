"""Extreme multi-label classification (10^5 labels) without the logits, on jaxbce.

Data: a synthetic extreme multi-label set, generated here from a fixed seed. Label
``c`` has a random prototype ``u_c`` in ``R^D`` (``D = --num-features``, unit norm on
average) and a Zipf-like frequency ``p_c ~ 1 / rank_c^s``: a few labels are common, most
are rare, as in product tagging or document labelling. Each sample draws 1 to
``--labels-per-sample`` labels from those frequencies (repeats count once) and its
features are the sum of their prototypes plus Gaussian noise (``--noise`` per unit
prototype): the labels are in the features, blurred.

Model: a Flax NNX MLP encoder and a final ``nnx.Linear(hidden, num_labels)`` whose
kernel and bias go to ``jaxbce.linear_binary_cross_entropy`` with the samples' positive
label indices: the ``[B, num_labels]`` logits and labels are never formed. The
classifier is split over every device by classes (``shard_map`` with ``axis_name``):
each device holds ``num_labels / devices`` columns of the kernel, its bias and their
optimizer state, and no device gathers them. One CPU runs the same code on a mesh of 1.

Reported: precision@1 and @5 on the test split (is the top-ranked label, are the top 5,
among the sample's labels), against predicting the most frequent training labels for
every sample.

    python examples/extreme_multilabel.py --out out/extreme
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/extreme_multilabel.py
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import trainlib
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbce

DATA_SEED = 0  # the data set never changes; --seed changes initialisation and shuffling
PAD = -1
TOP_K = 5
AXIS = "classes"


@dataclasses.dataclass(frozen=True)
class Config(trainlib.TrainConfig):
    epochs: int = 3
    batch_size: int = 256
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    num_labels: int = 100_000
    num_features: int = 64
    hidden: int = 64
    samples: int = 16_000
    labels_per_sample: int = 5
    zipf_exponent: float = 1.0
    noise: float = 0.5


# ------------------------------------------------------------------------------ data


def make_data(config: Config) -> dict[str, trainlib.Split]:
    """The synthetic set: ``x`` ``[n, D]`` features, ``y`` ``[n, K]`` positive label ids
    padded with -1; split 80/10/10 into train, validation and test."""
    rng = np.random.default_rng(DATA_SEED)
    c, d, n, k = config.num_labels, config.num_features, config.samples, config.labels_per_sample
    freq = 1.0 / np.arange(1, c + 1) ** config.zipf_exponent
    label_of_rank = rng.permutation(c)  # label ids do not follow their frequency
    prototypes = rng.standard_normal((c, d), np.float32) / np.sqrt(d)
    draws = label_of_rank[rng.choice(c, size=(n, k), p=freq / freq.sum())]
    draws[np.arange(k)[None, :] >= rng.integers(1, k + 1, n)[:, None]] = PAD
    draws = np.sort(draws, axis=1)
    draws[:, 1:][draws[:, 1:] == draws[:, :-1]] = PAD  # a repeat counts once
    x = np.where(draws[..., None] >= 0, prototypes[draws], 0.0).sum(axis=1)
    x += config.noise * rng.standard_normal((n, d), np.float32) / np.sqrt(d)
    order = rng.permutation(n)
    cut = [int(0.8 * n), int(0.9 * n)]
    parts = np.split(order, cut)
    return {
        name: {"x": x[rows].astype(np.float32), "y": draws[rows].astype(np.int32)}
        for name, rows in zip(("train", "val", "test"), parts, strict=True)
    }


def label_counts(y: np.ndarray, num_labels: int) -> np.ndarray:
    return np.bincount(y[y >= 0], minlength=num_labels)


def precision_at(top: np.ndarray, y: np.ndarray, k: int) -> float:
    """Mean over samples of ``|top k ∩ labels| / k`` (``top`` ``[n, >= k]``)."""
    hits = (top[:, :k, None] == y[:, None, :]) & (y[:, None, :] >= 0)
    return float(hits.any(axis=2).sum(axis=1).mean() / k)


# ----------------------------------------------------------------------------- model


class Model(nnx.Module):
    """``[B, D]`` features -> ``[B, hidden]`` encoding; ``classifier`` maps it to the
    ``[B, num_labels]`` logits, which only evaluation forms (one batch at a time)."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        self.layer1 = nnx.Linear(config.num_features, config.hidden, rngs=rngs)
        self.layer2 = nnx.Linear(config.hidden, config.hidden, rngs=rngs)
        # Zero weights and the labels' mean rate as the bias: every logit starts at the
        # prior's, instead of at 0 with the loss dominated for thousands of steps by
        # pushing 10^5 negatives down (the prior initialisation of Lin et al., 2017).
        rate = (config.labels_per_sample + 1) / 2 / config.num_labels
        self.classifier = nnx.Linear(
            config.hidden,
            config.num_labels,
            kernel_init=nnx.initializers.zeros,
            bias_init=nnx.initializers.constant(np.log(rate / (1 - rate))),
            rngs=rngs,
        )

    def encode(self, x: jax.Array) -> jax.Array:
        return self.layer2(nnx.relu(self.layer1(x)))


class ClassParallel:
    """A 1-D ``"classes"`` mesh over every device: the classifier's kernel ``[H, C]``
    and bias ``[C]`` are split by classes, everything else is replicated."""

    def __init__(self) -> None:
        self.mesh = Mesh(np.asarray(jax.devices()), (AXIS,))
        self.num_devices = self.mesh.size
        self.replicated = NamedSharding(self.mesh, P())

    def spec(self, path: tuple) -> P:
        """The partition of a state leaf: the classifier's kernel and bias, and their
        optimizer moments (whose paths end the same way), by classes."""
        key = jax.tree_util.keystr(path)
        if "'classifier'" in key and "'kernel'" in key:
            return P(None, AXIS)
        if "'classifier'" in key and "'bias'" in key:
            return P(AXIS)
        return P()

    def place(self, *nodes: nnx.Module | nnx.Optimizer) -> None:
        """Moves the state of NNX modules / optimizers to the mesh, in place."""
        state = nnx.state(nodes)
        nnx.update(
            nodes,
            jax.tree_util.tree_map_with_path(
                lambda path, v: jax.device_put(v, NamedSharding(self.mesh, self.spec(path))),
                state,
            ),
        )

    def replicate(self, tree):
        return jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(
                self.replicated, np.asarray(a), np.shape(a)
            ),
            tree,
        )


def loss_fn(model: Model, batch: dict[str, jax.Array], mesh: Mesh) -> jax.Array:
    """Mean BCE over every (sample, label) pair of the real rows, from the positives."""
    h = model.encode(batch["x"])

    def local(h, kernel, bias, positives, rows):
        # this device's classes; rows: 1 for real samples, 0 for batch padding
        return jaxbce.linear_binary_cross_entropy(
            h,
            kernel,
            positive_indices=positives,  # global label ids, -1 = padding
            bias=bias,
            weight=rows[:, None],  # [B, 1]: padding rows count for nothing
            axis_name=AXIS,
            reduction="sum",
        )

    total = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(None, AXIS), P(AXIS), P(), P()),
        out_specs=P(),
    )(h, model.classifier.kernel[...], model.classifier.bias[...], batch["y"], batch["rows"])
    return total / (jnp.sum(batch["rows"]) * model.classifier.out_features)


@functools.partial(nnx.jit, static_argnames="mesh")
def train_step(model: Model, optimizer: nnx.Optimizer, batch, mesh: Mesh) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch, mesh)
    optimizer.update(model, grads)
    return loss


@functools.partial(nnx.jit, static_argnames="mesh")
def top_labels(model: Model, x: jax.Array, mesh: Mesh) -> jax.Array:
    """``[B, 5]`` label ids ranked by logit: each device ranks its own classes, then the
    devices' candidates are ranked together (no device forms all ``[B, C]`` logits)."""
    h = model.encode(x)

    def local(h, kernel, bias):
        logits = h @ kernel + bias[None, :]  # [B, C_local], one batch
        values, idx = jax.lax.top_k(logits, TOP_K)
        idx = idx + jax.lax.axis_index(AXIS) * kernel.shape[1]
        values = jax.lax.all_gather(values, AXIS, axis=1, tiled=True)
        idx = jax.lax.all_gather(idx, AXIS, axis=1, tiled=True)
        best = jax.lax.top_k(values, TOP_K)[1]
        return jnp.take_along_axis(idx, best, axis=1)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(None, AXIS), P(AXIS)),
        out_specs=P(),
        check_vma=False,  # the gathered ranking is the same on every device
    )(h, model.classifier.kernel[...], model.classifier.bias[...])


def predict(cp: ClassParallel, model: Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Top-5 label ids of every row of ``x``, in padded batches of one shape."""
    out = []
    for start in range(0, len(x), batch_size):
        rows = x[start : start + batch_size]
        padded = np.pad(rows, ((0, batch_size - len(rows)), (0, 0)))
        top = top_labels(model, cp.replicate(padded), cp.mesh)
        out.append(np.asarray(jax.device_get(top))[: len(rows)])
    return np.concatenate(out)


# ------------------------------------------------------------------------- training


def train_and_evaluate(config: Config, *, max_steps: int | None = None) -> dict:
    if config.num_labels % jax.device_count():
        raise ValueError(
            f"num_labels={config.num_labels} must be a multiple of the device count "
            f"{jax.device_count()} (each device holds as many classes)."
        )
    start_time = time.perf_counter()
    cp = ClassParallel()
    data = make_data(config)
    train, val, test = data["train"], data["val"], data["test"]
    model = Model(config, rngs=nnx.Rngs(config.seed))
    tx = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    cp.place(model, optimizer)

    counts = label_counts(train["y"], config.num_labels)
    frequent = np.argsort(-counts, kind="stable")[:TOP_K]
    keys = ("step_loss", "train_loss", "epoch_end_step", "val_precision_at_1", "val_precision_at_5")
    history: dict[str, list[float]] = {key: [] for key in keys}
    rng = np.random.default_rng(config.seed)
    steps = 0
    bar = trainlib.progress(range(config.epochs), desc="extreme multi-label", quiet=config.quiet)
    for _ in bar:
        losses = []
        for idx, mask in trainlib.shuffled_batches(len(train["y"]), config.batch_size, rng):
            batch = {"x": train["x"][idx], "y": train["y"][idx], "rows": mask.astype(np.float32)}
            losses.append(train_step(model, optimizer, cp.replicate(batch), cp.mesh))
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        top = predict(cp, model, val["x"], config.batch_size)
        history["step_loss"] += [float(v) for v in jax.device_get(losses)]
        history["train_loss"].append(float(np.mean(history["step_loss"][-len(losses) :])))
        history["epoch_end_step"].append(steps)
        history["val_precision_at_1"].append(precision_at(top, val["y"], 1))
        history["val_precision_at_5"].append(precision_at(top, val["y"], 5))
        bar.set_postfix({key: f"{history[key][-1]:.4g}" for key in keys[1:]})
        if max_steps is not None and steps >= max_steps:
            break

    top = predict(cp, model, test["x"], config.batch_size)
    baseline = np.broadcast_to(frequent, (len(test["y"]), TOP_K))
    metrics = {
        "num_labels": config.num_labels,
        "precision_at_1": precision_at(top, test["y"], 1),
        "precision_at_5": precision_at(top, test["y"], 5),
        "baseline_precision_at_1": precision_at(baseline, test["y"], 1),
        "baseline_precision_at_5": precision_at(baseline, test["y"], 5),
        "labels_seen_in_training": float((counts > 0).mean()),
    }
    seconds = time.perf_counter() - start_time
    path = trainlib.save_run(
        config.out, metrics, {"": history}, config, cp.num_devices, seconds=seconds
    )
    if path is not None:
        plot(path / "extreme_multilabel.png", history, metrics)
    return metrics


def plot(path: Path, history: dict[str, list[float]], metrics: dict[str, float]) -> None:
    """The training loss per step, and validation precision@k after each epoch against
    the most-frequent-labels baseline."""
    plt = trainlib.plt
    fig, (ax_loss, ax_p) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(np.arange(1, len(history["step_loss"]) + 1), history["step_loss"], lw=1)
    ax_loss.set(xlabel="step", ylabel="mean BCE per (sample, label)", yscale="log")
    ax_loss.set_title(f"Training loss, {metrics['num_labels']:,} labels")
    for k, color in ((1, "C0"), (5, "C1")):
        ax_p.plot(history["epoch_end_step"], history[f"val_precision_at_{k}"], marker="o",
                  color=color, label=f"P@{k}, validation")  # fmt: skip
        ax_p.axhline(metrics[f"baseline_precision_at_{k}"], color=color, ls="--",
                     label=f"P@{k}, most frequent labels")  # fmt: skip
    ax_p.set(xlabel="step", ylabel="precision", ylim=(0, 1), title="Precision@k")
    ax_p.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    config = trainlib.parse_config(Config, __doc__, argv)
    metrics = train_and_evaluate(config)
    trainlib.report(
        f"Extreme multi-label: {config.num_labels:,} labels on {jax.device_count()} device(s)",
        metrics,
        config.out,
    )
    return metrics


if __name__ == "__main__":
    main()
