"""Where naive binary cross-entropy breaks in float32, and jaxbce does not.

Loss and gradient (with respect to the logit ``z``) over ``z`` in [-100, 100], label 1
and label 0, three ways, all in float32:

* naive:   ``-(y log(sigmoid(z)) + (1 - y) log(1 - sigmoid(z)))``, autodiff gradient;
* clamped: ``jaxbce.binary_cross_entropy(sigmoid(z), y)``, PyTorch's ``BCELoss``: each
  log clamped at -100, finite everywhere;
* jaxbce:  ``jaxbce.binary_cross_entropy_with_logits(z, y)``.

The reference is the exact loss ``softplus(z) - y z`` and gradient ``sigmoid(z) - y``
in float64. ``sigmoid(z)`` rounds to exactly 1 in float32 once ``z`` passes about 17 and
to exactly 0 below about -88: past those points the naive form returns inf or NaN, and
the clamped form saturates at 100 with a zero (vanishing) or wrong gradient, on
exactly the confidently wrong predictions that most need a gradient.

    python examples/stability.py --out out/stability
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import jaxbce

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

TINY = float(np.finfo(np.float32).tiny)  # below this the float32 answer may flush to 0
RTOL = 1e-3  # a point is "wrong" past this relative error
# (label, logit) rows of the printed table
TABLE_POINTS = ((1, -100), (1, -88), (1, -30), (0, 0), (0, 17), (0, 20), (0, 50), (0, 100))


def naive(z: jax.Array, y: jax.Array) -> jax.Array:
    p = jax.nn.sigmoid(z)
    return -(y * jnp.log(p) + (1 - y) * jnp.log(1 - p))


def clamped(z: jax.Array, y: jax.Array) -> jax.Array:
    return jaxbce.binary_cross_entropy(jax.nn.sigmoid(z), y, reduction="none")


def from_logits(z: jax.Array, y: jax.Array) -> jax.Array:
    return jaxbce.binary_cross_entropy_with_logits(z, y, reduction="none")


METHODS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "naive": naive,
    "clamped": clamped,
    "jaxbce": from_logits,
}


def exact(z: np.ndarray, y: float) -> tuple[np.ndarray, np.ndarray]:
    """Float64 loss ``softplus(z) - y z`` and gradient ``sigmoid(z) - y``, cancellation-free
    for hard labels."""
    z = np.asarray(z, np.float64)
    loss = np.logaddexp(0.0, -z) if y == 1 else np.logaddexp(0.0, z)
    sig = lambda t: np.exp(-np.logaddexp(0.0, -t))  # noqa: E731
    grad = -sig(-z) if y == 1 else sig(z)
    return loss, grad


def evaluate(z: np.ndarray, y: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{method: (loss, gradient)}`` in float32 at the logits ``z`` for the label ``y``."""
    zf = jnp.asarray(z, jnp.float32)
    yf = jnp.full_like(zf, y)
    out = {}
    for name, fn in METHODS.items():
        loss, vjp = jax.vjp(lambda t, fn=fn: fn(t, yf), zf)
        (grad,) = vjp(jnp.ones_like(loss))  # elementwise loss: the vjp of ones is the gradient
        out[name] = (np.asarray(loss, np.float64), np.asarray(grad, np.float64))
    return out


def bad_points(value: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Non-finite, or off by more than RTOL where the reference is a normal float32."""
    err = np.abs(value - reference) / np.maximum(np.abs(reference), TINY)
    return ~np.isfinite(value) | ((np.abs(reference) >= TINY) & (err > RTOL))


def rel_err(value: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Relative error where the reference is a normal float32 (NaN elsewhere or if
    ``value`` is not finite)."""
    ok = (np.abs(reference) >= TINY) & np.isfinite(value)
    err = np.abs(value - reference) / np.maximum(np.abs(reference), TINY)
    return np.where(ok, err, np.nan)


def summarize(z: np.ndarray) -> dict[str, float]:
    """Per method: the fraction of grid points (both labels) with a non-finite or wrong
    loss or gradient, the non-finite count, and the largest relative errors."""
    results = {y: (evaluate(z, y), exact(z, y)) for y in (1.0, 0.0)}
    summary = {}
    for name in METHODS:
        bad = nonfinite = 0
        errs_loss, errs_grad = [], []
        for vals, (ref_loss, ref_grad) in results.values():
            loss, grad = vals[name]
            bad += np.sum(bad_points(loss, ref_loss) | bad_points(grad, ref_grad))
            nonfinite += np.sum(~np.isfinite(loss) | ~np.isfinite(grad))
            errs_loss.append(rel_err(loss, ref_loss))
            errs_grad.append(rel_err(grad, ref_grad))
        summary[f"{name}_bad_fraction"] = float(bad / (2 * len(z)))
        summary[f"{name}_nonfinite_points"] = float(nonfinite)
        summary[f"{name}_max_rel_err_loss"] = float(np.nanmax(np.concatenate(errs_loss)))
        summary[f"{name}_max_rel_err_grad"] = float(np.nanmax(np.concatenate(errs_grad)))
    return summary


def table(points: Sequence[tuple[float, float]] = TABLE_POINTS) -> str:
    """A short text table of loss and gradient at a few ``(label, logit)`` points."""
    names = [*METHODS, "exact"]
    head = f"{'y':>2} {'z':>5} | " + " ".join(f"{'loss ' + n:>13}" for n in names)
    head += " | " + " ".join(f"{'grad ' + n:>13}" for n in names)
    lines = [head, "-" * len(head)]
    for y, z in points:
        vals, ref = evaluate(np.array([z]), y), exact(np.array([z]), y)
        losses = [vals[n][0][0] for n in METHODS] + [ref[0][0]]
        grads = [vals[n][1][0] for n in METHODS] + [ref[1][0]]
        lines.append(
            f"{y:>2.0f} {z:>5.0f} | "
            + " ".join(f"{v:>13.6g}" for v in losses)
            + " | "
            + " ".join(f"{v:>13.6g}" for v in grads)
        )
    return "\n".join(lines)


def plot(z: np.ndarray, path: Path) -> None:
    """Loss, gradient and gradient error against the logit; x marks at the top of a
    panel are logits where that method returned inf or NaN."""
    fig, axes = plt.subplots(3, 2, figsize=(11, 10), sharex=True)
    styles = {"naive": ("C3", 2.5), "clamped": ("C1", 2.0), "jaxbce": ("C0", 1.2)}
    for col, y in enumerate((1.0, 0.0)):
        vals, (ref_loss, ref_grad) = evaluate(z, y), exact(z, y)
        for name, (loss, grad) in vals.items():
            color, lw = styles[name]
            for row, value in enumerate((loss, grad)):
                ax = axes[row, col]
                ax.plot(
                    z, np.where(np.isfinite(value), value, np.nan), color=color, lw=lw, label=name
                )
                off = ~np.isfinite(value)
                ax.plot(
                    z[off],
                    np.full(off.sum(), 0.97 - 0.04 * list(vals).index(name)),
                    "x",
                    ms=3,
                    color=color,
                    transform=ax.get_xaxis_transform(),
                )
            err = rel_err(grad, ref_grad)
            axes[2, col].semilogy(z, np.maximum(err, 1e-9), color=color, lw=lw, label=name)
        axes[0, col].plot(z, ref_loss, "k:", lw=1, label="exact")
        axes[1, col].plot(z, ref_grad, "k:", lw=1, label="exact")
        axes[0, col].set(title=f"label y = {y:.0f}", ylabel="loss")
        axes[1, col].set(ylabel="d loss / d z")
        axes[2, col].set(ylabel="gradient relative error", xlabel="logit z (float32)")
        axes[2, col].axhline(1.0, color="grey", lw=0.5)
    for ax in axes.flat:
        ax.legend(fontsize="small", loc="center left")
    fig.suptitle("BCE in float32: x = inf/NaN; error 1 = vanishing gradient (floored at 1e-9)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: str | None = None, num: int = 2001) -> dict[str, float]:
    """Summary over ``num`` logits in [-100, 100]; writes ``stability.png`` into ``out``."""
    z = np.linspace(-100.0, 100.0, num).astype(np.float32).astype(np.float64)  # exact f32
    summary = summarize(z)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        plot(z, Path(out) / "stability.png")
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="directory for stability.png")
    args = parser.parse_args(argv)
    summary = run(args.out)
    print(table())
    print()
    for name in METHODS:
        print(
            f"{name:>8}: {summary[f'{name}_bad_fraction']:6.1%} of logits give a wrong or "
            f"non-finite loss or gradient ({summary[f'{name}_nonfinite_points']:.0f} "
            f"non-finite); max relative error where finite: loss "
            f"{summary[f'{name}_max_rel_err_loss']:.2g}, gradient "
            f"{summary[f'{name}_max_rel_err_grad']:.2g}"
        )
    if args.out is not None:
        print(f"wrote {Path(args.out) / 'stability.png'}")
    return summary


if __name__ == "__main__":
    main()
