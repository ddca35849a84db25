"""What the benchmark runs: the cases, their inputs, every loss compared, the copy that
gives the memory limit, and the float64 reference every result is checked against.

Every loss is the mean sigmoid BCE of ``[n // CLASSES, CLASSES]`` logits against labels
of the same shape, optionally with a per-class ``pos_weight`` or ``weight`` (``[CLASSES]``)
or a ``where`` mask (``[n // CLASSES, CLASSES]`` bool). "vg" times ``value_and_grad``
w.r.t. the logits, "fwd" the loss alone.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbce

LOGIT_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
LABEL_DTYPES = {"f32": jnp.float32, "bool": jnp.bool_, "int8": jnp.int8}
OPTIONS = ("none", "pos_weight", "weight", "where")
MODES = ("vg", "fwd")
CLASSES = 256
JAX_IMPLS = ("jaxbce", "optax", "sigmoid-log")


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: ``n`` elements of the given dtypes, one option, one mode."""

    n: int
    logits: str = "f32"
    labels: str = "f32"
    option: str = "none"
    mode: str = "vg"

    @property
    def dtypes(self) -> str:
        return f"{self.logits}/{self.labels}"

    @property
    def label(self) -> str:
        return self.dtypes + ("" if self.option == "none" else f" +{self.option}")

    def bytes_moved(self) -> int:
        """The floor: read logits, labels (and mask) once; write the gradient once."""
        zb = np.dtype(LOGIT_DTYPES[self.logits]).itemsize
        yb = np.dtype(LABEL_DTYPES[self.labels]).itemsize
        per = zb + yb + (1 if self.option == "where" else 0) + (zb if self.mode == "vg" else 0)
        return self.n * per


# ----------------------------------------------------------------------------- inputs


@functools.lru_cache(maxsize=8)  # every size of a sweep
def _base_inputs(n: int, seed: int) -> dict[str, np.ndarray]:
    """The values every dtype pair shares: float32 logits, bool labels, the options."""
    rng = np.random.default_rng(seed)
    shape = (n // CLASSES, CLASSES)
    return {
        "z": 2 * rng.standard_normal(shape, np.float32),
        "y": rng.random(shape, np.float32) < 0.3,
        "pos_weight": rng.uniform(0.5, 4.0, CLASSES).astype(np.float32),
        "weight": rng.uniform(0.5, 1.5, CLASSES).astype(np.float32),
        "where": rng.random(shape, np.float32) < 0.9,
    }


@functools.lru_cache(maxsize=8)  # every size of a sweep
def _logits(n: int, logits: str, seed: int) -> np.ndarray:
    z = _base_inputs(n, seed)["z"]
    return z if logits == "f32" else z.astype(LOGIT_DTYPES[logits])


def host_inputs(n: int, logits: str, labels: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Logits ~ N(0, 2^2) (sigmoid-then-log stays finite), hard labels P(1) = 0.3.

    The values are the same for every dtype pair (bf16 logits are the float32 ones
    rounded), so the inputs of the largest size are drawn once per run."""
    base = _base_inputs(n, seed)
    y = base["y"] if labels == "bool" else base["y"].astype(LABEL_DTYPES[labels])
    return base | {"z": _logits(n, logits, seed), "y": y}


def aux_of(case: Case, host: dict[str, np.ndarray]) -> np.ndarray | None:
    return None if case.option == "none" else host[case.option]


# ----------------------------------------------------------------------- the losses


def _reduce(loss: jax.Array, option: str, aux: Any) -> jax.Array:
    """The mean as jaxbce defines it: over all entries, or the selected ones for where."""
    if option == "weight":
        return jnp.mean(loss * aux)
    if option == "where":
        return jnp.mean(loss, where=aux)
    return jnp.mean(loss)


def jaxbce_loss(option: str) -> Callable:
    key = None if option == "none" else option

    def f(z, y, aux):
        kw = {} if key is None else {key: aux}
        return jaxbce.binary_cross_entropy_with_logits(z, y, **kw)

    return f


def optax_loss(option: str) -> Callable:
    """``optax.losses.sigmoid_binary_cross_entropy``; optax has no ``pos_weight``, so that
    option uses optax's own formula with the weight on the positive term."""

    def f(z, y, aux):
        y = y.astype(z.dtype)
        if option == "pos_weight":
            loss = -(aux * y * jax.nn.log_sigmoid(z) + (1 - y) * jax.nn.log_sigmoid(-z))
        else:
            loss = optax.losses.sigmoid_binary_cross_entropy(z, y)
        return _reduce(loss, option, aux)

    return f


def sigmoid_log_loss(option: str) -> Callable:
    """The textbook ``-(y log p + (1 - y) log(1 - p))`` with ``p = sigmoid(z)``."""

    def f(z, y, aux):
        y = y.astype(z.dtype)
        p = jax.nn.sigmoid(z)
        pos, neg = y * jnp.log(p), (1 - y) * jnp.log(1 - p)
        if option == "pos_weight":
            pos = aux * pos
        return _reduce(-(pos + neg), option, aux)

    return f


LOSSES = {"jaxbce": jaxbce_loss, "optax": optax_loss, "sigmoid-log": sigmoid_log_loss}


def copy_fn(case: Case) -> Callable:
    """The same bytes as the loss, with no math: read logits and labels (and the mask)
    once and, for "vg", write one array of the logits' shape and dtype."""
    if case.mode == "vg":

        def f(z, y, aux):
            out = z + y.astype(z.dtype)
            return out if case.option != "where" else jnp.where(aux, out, z)

    else:

        def f(z, y, aux):
            s = jnp.sum(z, dtype=jnp.float32) + jnp.sum(y, dtype=jnp.float32)
            return s if case.option != "where" else s + jnp.sum(aux, dtype=jnp.float32)

    return f


def jax_callable(name: str, case: Case) -> Callable:
    if name == "copy":
        return copy_fn(case)
    loss = LOSSES[name](case.option)
    return jax.value_and_grad(loss) if case.mode == "vg" else loss


def compile_jax(name: str, case: Case, args: tuple) -> Any:
    """Compiles once, ahead of time, for the given (device) arguments."""
    return jax.jit(jax_callable(name, case)).lower(*args).compile()


# ---------------------------------------------------------------------------- torch


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_runner(case: Case, host: dict[str, np.ndarray], device: str) -> Callable[[], Any]:
    """PyTorch eager ``BCEWithLogitsLoss`` (forward, and backward for "vg").

    Labels are converted to the logits' dtype inside the timed call: PyTorch accepts only
    float targets (pytorch #842). ``where`` has no PyTorch option: reduction="none",
    then a masked mean.
    """
    import torch

    tdt = {"f32": torch.float32, "bf16": torch.bfloat16}[case.logits]
    z = torch.from_numpy(np.asarray(host["z"], np.float32)).to(device=device, dtype=tdt)
    y = torch.from_numpy(np.asarray(host["y"])).to(device)
    kw: dict[str, Any] = {}
    if case.option in ("pos_weight", "weight"):
        kw[case.option] = torch.from_numpy(host[case.option]).to(device=device, dtype=tdt)
    mask = torch.from_numpy(host["where"]).to(device) if case.option == "where" else None
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none" if mask is not None else "mean", **kw)
    z.requires_grad_(case.mode == "vg")

    def run():
        with torch.set_grad_enabled(case.mode == "vg"):
            loss = loss_fn(z, y.to(tdt))
            if mask is not None:
                loss = (loss * mask).sum() / mask.sum()
            if case.mode == "vg":
                z.grad = None
                loss.backward()
                return loss, z.grad
            return loss

    return run


# ------------------------------------------------------------------------ reference


def reference(n: int, logits: str, labels: str, sample: int = 1 << 18) -> dict[str, Any]:
    """float64 mean loss for every option (over all entries, in chunks, in one pass) and
    the gradient w.r.t. the logits at ``sample`` fixed random positions. The labels'
    values do not depend on their dtype, so one reference serves all three."""
    return _reference(n, logits, sample)


@functools.lru_cache(maxsize=8)  # every size of a sweep
def _reference(n: int, logits: str, sample: int) -> dict[str, Any]:
    host = host_inputs(n, logits, "f32")
    z = np.asarray(host["z"], np.float64).reshape(-1, CLASSES)
    y = np.asarray(host["y"], np.float64).reshape(-1, CLASSES)
    pw, w = host["pos_weight"].astype(np.float64), host["weight"].astype(np.float64)
    m = host["where"]
    sums = dict.fromkeys(OPTIONS, 0.0)
    rows = max(1, (1 << 22) // CLASSES)
    for r in range(0, z.shape[0], rows):
        zi, yi, mi = z[r : r + rows], y[r : r + rows], m[r : r + rows]
        neg, pos = (1 - yi) * np.logaddexp(0, zi), yi * np.logaddexp(0, -zi)
        sums["none"] += (neg + pos).sum()
        sums["pos_weight"] += (neg + pw * pos).sum()
        sums["weight"] += ((neg + pos) * w).sum()
        sums["where"] += ((neg + pos) * mi).sum()
    count = {o: float(n) for o in OPTIONS} | {"where": float(m.sum())}
    idx = np.sort(np.random.default_rng(1).choice(n, min(sample, n), replace=False))
    zi, yi, ci = z.ravel()[idx], y.ravel()[idx], idx % CLASSES
    s_pos, s_neg = 1 / (1 + np.exp(-zi)), 1 / (1 + np.exp(zi))
    grads = {
        "none": (1 - yi) * s_pos - yi * s_neg,
        "pos_weight": (1 - yi) * s_pos - pw[ci] * yi * s_neg,
        "weight": ((1 - yi) * s_pos - yi * s_neg) * w[ci],
        "where": ((1 - yi) * s_pos - yi * s_neg) * m.ravel()[idx],
    }
    return {
        o: {"loss": sums[o] / count[o], "idx": idx, "grad": grads[o] / count[o]} for o in OPTIONS
    }


def verify(case: Case, out: Any) -> dict[str, Any]:
    """Relative error of the loss and of the sampled gradient (w.r.t. its largest entry)."""
    ref = reference(case.n, case.logits, case.labels)[case.option]
    tol = 1e-4 if case.logits == "f32" else 3e-2
    if case.mode == "vg":
        loss, grad = out
    else:
        loss, grad = out, None
    loss = float(loss.detach().float()) if hasattr(loss, "detach") else float(loss)
    err = {"loss_rel_err": abs(loss - ref["loss"]) / abs(ref["loss"])}
    if grad is not None:
        flat = grad.reshape(-1) if hasattr(grad, "reshape") else grad
        got = _take(flat, ref["idx"])
        err["grad_rel_err"] = float(np.max(np.abs(got - ref["grad"])) / np.max(np.abs(ref["grad"])))
    err["ok"] = bool(all(v <= tol for v in err.values()))
    return err


def _take(flat: Any, idx: np.ndarray) -> np.ndarray:
    if isinstance(flat, jax.Array):
        return np.asarray(flat[jnp.asarray(idx)], np.float64)
    import torch  # a torch tensor

    picked = flat.detach()[torch.from_numpy(idx).to(flat.device)]
    return picked.to(torch.float64).cpu().numpy()


# ------------------------------------------------------------------- sparse targets

# The sparse-targets comparison: jaxbce.sparse_binary_cross_entropy_with_logits(logits,
# positive_indices) against jaxbce.binary_cross_entropy_with_logits on the same labels
# given dense. value_and_grad w.r.t. the logits of the mean loss, f32 logits [B, C].
SPARSE_IMPLS = ("sparse", "dense-f32", "dense-bool", "scatter+dense")
SPARSE_COPIES = ("copy", "copy-f32", "copy-bool")
SPARSE_INPUTS = {
    "sparse": "idx",
    "dense-f32": "y_f32",
    "dense-bool": "y_bool",
    "scatter+dense": "idx",
    "copy": "idx",
    "copy-f32": "y_f32",
    "copy-bool": "y_bool",
}
# The copy of the same bytes as each loss: its memory limit.
SPARSE_COPY_OF = {
    "sparse": "copy",
    "scatter+dense": "copy",
    "dense-f32": "copy-f32",
    "dense-bool": "copy-bool",
}


@dataclasses.dataclass(frozen=True)
class SparseCase:
    """``n = B * C`` f32 logits with ``C = classes`` and ``[B, k]`` int32 positive indices."""

    n: int
    classes: int = 65536
    k: int = 32

    @property
    def batch(self) -> int:
        return self.n // self.classes

    @property
    def label(self) -> str:
        return f"{self.batch} x {self.classes}, K={self.k}"

    def bytes_moved(self, impl: str) -> int:
        """The floor of each implementation: what it must read and write once.

        The sparse loss (and a dense loss on labels scattered from the indices inside the
        function) reads the logits and the indices and writes the gradient; the dense
        losses read the logits and the labels and write the gradient.
        """
        idx = self.batch * self.k * 4
        per = {"y_f32": 12, "y_bool": 9, "idx": 8}[SPARSE_INPUTS[impl]]
        return self.n * per + (idx if SPARSE_INPUTS[impl] == "idx" else 0)


@functools.lru_cache(maxsize=1)
def sparse_host_inputs(n: int, classes: int, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Logits ~ N(0, 2^2); row b has ``count[b] ~ U{1..k}`` positives drawn uniformly from
    the classes (with replacement, so a few rows repeat an index, which counts once), the
    rest of its ``k`` slots ``-1``; the dense labels (f32 and bool) are the same positives."""
    rng = np.random.default_rng(seed)
    batch = n // classes
    z = 2 * rng.standard_normal((batch, classes), np.float32)
    idx = rng.integers(0, classes, (batch, k), dtype=np.int32)
    count = rng.integers(1, k + 1, batch)
    idx[np.arange(k)[None, :] >= count[:, None]] = -1
    rows, slots = np.nonzero(idx >= 0)
    y = np.zeros((batch, classes), np.bool_)
    y[rows, idx[rows, slots]] = True
    return {"z": z, "idx": idx, "y_bool": y, "y_f32": y.astype(np.float32)}


def sparse_callable(name: str) -> Callable:
    """value_and_grad of the mean loss w.r.t. the logits; the copies write one [B, C] f32."""
    if name == "sparse":
        return jax.value_and_grad(jaxbce.sparse_binary_cross_entropy_with_logits)
    if name in ("dense-f32", "dense-bool"):
        return jax.value_and_grad(jaxbce.binary_cross_entropy_with_logits)
    if name == "scatter+dense":  # what one writes without the sparse loss

        def f(z, idx):
            rows = jnp.arange(z.shape[0])[:, None]
            cols = jnp.where(idx < 0, z.shape[1], idx)  # pad: out of range, dropped
            y = jnp.zeros(z.shape, z.dtype).at[rows, cols].set(1, mode="drop")
            return jaxbce.binary_cross_entropy_with_logits(z, y)

        return jax.value_and_grad(f)
    if name == "copy":  # read logits and indices, write the gradient's bytes
        return lambda z, idx: z + jnp.sum(idx, dtype=jnp.float32)
    if name in ("copy-f32", "copy-bool"):  # read logits and dense labels, write [B, C] f32
        return lambda z, y: z + y.astype(z.dtype)
    raise ValueError(f"unknown sparse implementation {name!r}")


def compile_sparse(name: str, args: tuple) -> Any:
    return jax.jit(sparse_callable(name)).lower(*args).compile()


@functools.lru_cache(maxsize=1)
def sparse_reference(
    n: int, classes: int, k: int, sample: int = 1 << 18, positives: int = 1 << 16
) -> dict[str, Any]:
    """float64 mean loss over all entries (in chunks) and the gradient of the mean at
    ``sample`` random positions plus up to ``positives`` of the positive entries (where
    the sparse gradient is scattered in; random positions would hit few of them)."""
    host = sparse_host_inputs(n, classes, k)
    z, y = host["z"], host["y_bool"]
    total = 0.0
    rows = max(1, (1 << 22) // classes)
    for r in range(0, z.shape[0], rows):
        zi, yi = z[r : r + rows].astype(np.float64), y[r : r + rows]
        total += np.where(yi, np.logaddexp(0, -zi), np.logaddexp(0, zi)).sum()
    rng = np.random.default_rng(1)
    pos = np.flatnonzero(y)
    pos = rng.choice(pos, min(positives, pos.size), replace=False)
    idx = np.unique(np.concatenate([rng.choice(n, min(sample, n), replace=False), pos]))
    zi, yi = z.ravel()[idx].astype(np.float64), y.ravel()[idx].astype(np.float64)
    grad = (1 - yi) / (1 + np.exp(-zi)) - yi / (1 + np.exp(zi))
    return {"loss": total / n, "idx": idx, "grad": grad / n, "positives_checked": int(pos.size)}


def verify_sparse(case: SparseCase, out: Any) -> dict[str, Any]:
    """Relative error of the loss and of the sampled gradient (w.r.t. its largest entry)."""
    ref = sparse_reference(case.n, case.classes, case.k)
    loss, grad = out
    err = {"loss_rel_err": abs(float(loss) - ref["loss"]) / abs(ref["loss"])}
    got = _take(grad.reshape(-1), ref["idx"])
    err["grad_rel_err"] = float(np.max(np.abs(got - ref["grad"])) / np.max(np.abs(ref["grad"])))
    err["ok"] = bool(all(v <= 1e-4 for v in err.values()))
    err["positives_checked"] = ref["positives_checked"]
    return err
