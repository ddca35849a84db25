"""A whole jitted train step of the multi-label example, with jaxbce's loss vs optax's.

The model, loss and step are the example's own (``examples/multilabel_classifier.py``:
``MLP``, ``loss_fn``, ``train_step``). The optax step is the same step with the loss
swapped for ``optax.losses.sigmoid_binary_cross_entropy``, ``pos_weight`` applied as the
per-element weight it equals for hard labels, and the masked mean written out by hand.
Two sizes: the example's own (batch 64, 6 tags, where the loss is a sliver of the step)
and a wide multi-label head (many tags), where the loss is a visible part of it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxbce

CONFIGS = {
    "example": {"batch": 64, "features": 64, "hidden": 256, "tags": 6},
    "wide": {"batch": 512, "features": 64, "hidden": 256, "tags": 4096},
}


def _example_module() -> tuple[Any, str]:
    """The example's module, or None if it cannot be imported here."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "examples")
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        import multilabel_classifier as example
    except Exception as err:  # noqa: BLE001 - any import problem means: use the fallback
        return None, f"fallback MLP in benchmarks/train_step.py ({type(err).__name__}: {err})"
    return example, "examples/multilabel_classifier.py (MLP, loss_fn, train_step)"


class _MLP(nnx.Module):
    """Fallback with the example's architecture: two hidden ReLU layers."""

    def __init__(self, in_features: int, hidden: int, num_tags: int, *, rngs: nnx.Rngs):
        self.layer1 = nnx.Linear(in_features, hidden, rngs=rngs)
        self.layer2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, num_tags, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.layer2(nnx.relu(self.layer1(x)))))


def _jaxbce_loss_fn(model, batch, pos_weight):
    logits = model(batch["x"])
    loss = jaxbce.binary_cross_entropy_with_logits(
        logits, batch["y"], pos_weight=pos_weight, where=batch["mask"][:, None], ignore_index=-1
    )
    return loss, logits


def _optax_loss_fn(model, batch, pos_weight):
    logits = model(batch["x"])
    y = batch["y"]
    keep = (y != -1) & batch["mask"][:, None]
    yf = jnp.where(keep, y, 0).astype(logits.dtype)
    loss = optax.losses.sigmoid_binary_cross_entropy(logits, yf)
    loss = loss * jnp.where(yf == 1, pos_weight, 1.0)  # pos_weight, for hard labels
    return jnp.sum(jnp.where(keep, loss, 0)) / jnp.maximum(jnp.sum(keep), 1), logits


def _make_step(loss_fn: Callable) -> Callable:
    @nnx.jit
    def step(model, optimizer, batch, pos_weight):
        (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch, pos_weight)
        optimizer.update(model, grads)
        return loss

    return step


def time_train_steps(*, repeats: int, steps_per_sample: int = 5) -> dict[str, Any]:
    """ms per train step for each config, jaxbce vs optax, interleaved, median."""
    example, source = _example_module()
    mlp = example.MLP if example is not None else _MLP
    jaxbce_fn = example.loss_fn if example is not None else _jaxbce_loss_fn
    jaxbce_step = example.train_step if example is not None else _make_step(jaxbce_fn)
    steps = {"jaxbce": jaxbce_step, "optax": _make_step(_optax_loss_fn)}
    out: dict[str, Any] = {"source": source, "configs": {}}
    for cname, cfg in CONFIGS.items():
        rng = np.random.default_rng(0)
        batch = {
            "x": jnp.asarray(rng.standard_normal((cfg["batch"], cfg["features"]), np.float32)),
            "y": jnp.asarray((rng.random((cfg["batch"], cfg["tags"])) < 0.2).astype(np.int32)),
            "mask": jnp.ones(cfg["batch"], bool),
        }
        pos_weight = jaxbce.pos_weight_from_labels(batch["y"])
        state = {}
        for name in steps:
            model = mlp(cfg["features"], cfg["hidden"], cfg["tags"], rngs=nnx.Rngs(0))
            opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
            state[name] = (model, opt)
            for _ in range(3):  # compile and warm up
                jax.block_until_ready(steps[name](model, opt, batch, pos_weight))
        times: dict[str, list[float]] = {name: [] for name in steps}
        for r in range(repeats):
            for name in list(steps)[r % 2 :] + list(steps)[: r % 2]:
                model, opt = state[name]
                t0 = time.perf_counter()
                for _ in range(steps_per_sample):
                    loss = steps[name](model, opt, batch, pos_weight)
                jax.block_until_ready(loss)
                times[name].append((time.perf_counter() - t0) / steps_per_sample)
        t = {k: np.asarray(v) for k, v in times.items()}
        out["configs"][cname] = {
            **cfg,
            "loss_elements": cfg["batch"] * cfg["tags"],
            "ms": {k: float(np.median(v) * 1e3) for k, v in t.items()},
            "speedup_vs_optax": float(np.median(t["optax"] / t["jaxbce"])),
        }
    return out
