"""The float64 (and mpmath) references every test module compares jaxbce with.

float64 is enough for float32 inputs: they are exact in float64; the loss is a sum of
non-negative terms (``max(z, 0) + log1p(exp(-|z|))`` and its mirror) and each sigmoid
comes from one ``exp(-|z|)``, so the reference's relative error is a few float64 eps
(``test_accuracy.test_float64_reference_agrees_with_mpmath`` checks it against mpmath).
"""

from __future__ import annotations

import mpmath
import numpy as np


def f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def softplus(z) -> np.ndarray:
    """``max(z, 0) + log1p(exp(-|z|))``: both terms >= 0, exact at +-inf."""
    z = f64(z)
    return np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z)))


def sigmoids(z) -> tuple[np.ndarray, np.ndarray]:
    """``sigmoid(z)`` and ``sigmoid(-z)`` from one ``exp(-|z|)``, no cancellation."""
    z = f64(z)
    e = np.exp(-np.abs(z))
    r = 1.0 / (1.0 + e)
    return np.where(z >= 0, r, e * r), np.where(z >= 0, e * r, r)


def sigmoid(z) -> np.ndarray:
    return sigmoids(z)[0]


def times(c, x) -> np.ndarray:
    """``c * x`` with ``0 * inf = 0``: a hard label's unused term is absent."""
    with np.errstate(invalid="ignore"):
        return np.where(c == 0, 0.0, c * x)


def bce(z, y, pw=1.0) -> np.ndarray:
    """Element-wise ``(1 - y) softplus(z) + pw y softplus(-z)``."""
    y = f64(y)
    return times(1 - y, softplus(z)) + times(f64(pw) * y, softplus(-f64(z)))


def bce_grad(z, y, pw=1.0) -> tuple[np.ndarray, np.ndarray]:
    """d/dz of :func:`bce` and the size of its two terms (what a soft label's gradient,
    which vanishes at z = logit(y), is measured against)."""
    y = f64(y)
    s_pos, s_neg = sigmoids(z)
    a, b = (1 - y) * s_pos, f64(pw) * y * s_neg
    return a - b, a + b


def reduce(loss, *, w=None, mask=None, axis=None, reduction="mean") -> np.ndarray:
    """Weight, mask and reduce as jaxbce documents it (an empty mean is 0)."""
    loss = f64(loss)
    w = np.ones_like(loss) if w is None else np.broadcast_to(f64(w), loss.shape)
    m = np.ones(loss.shape, bool) if mask is None else np.broadcast_to(mask, loss.shape)
    loss = np.where(m, loss * w, 0.0)
    if reduction == "none":
        return loss
    total = loss.sum(axis=axis)
    if reduction == "sum":
        return total
    den = m.sum(axis=axis) if reduction == "mean" else np.where(m, w, 0).sum(axis=axis)
    return total / np.where(den == 0, 1, den)


def bce_reduced(z, y, *, w=None, pw=None, eps=0.0, mask=None, axis=None, reduction="mean"):
    """:func:`bce` with every option of ``binary_cross_entropy_with_logits``."""
    y = f64(y) * (1 - eps) + eps / 2
    loss = bce(z, y, 1.0 if pw is None else pw)
    return reduce(loss, w=w, mask=mask, axis=axis, reduction=reduction)


@mpmath.workdps(40)
def bce_mpmath(z: float, y: float, pw: float = 1.0) -> tuple[mpmath.mpf, mpmath.mpf, mpmath.mpf]:
    """Loss, gradient and the gradient's terms' size at one point, to 40 digits."""
    m, my = mpmath.mpf(float(z)), mpmath.mpf(float(y))
    sp_pos, sp_neg = mpmath.log1p(mpmath.exp(m)), mpmath.log1p(mpmath.exp(-m))
    sig_pos, sig_neg = 1 / (1 + mpmath.exp(-m)), 1 / (1 + mpmath.exp(m))
    loss = (1 - my) * sp_pos + pw * my * sp_neg
    return loss, (1 - my) * sig_pos - pw * my * sig_neg, (1 - my) * sig_pos + pw * my * sig_neg


def ulp(got, true, dtype=np.float32) -> np.ndarray:
    """``|got - true|`` in units of the spacing of ``true`` rounded to ``dtype``."""
    spacing = np.spacing(np.abs(f64(true)).astype(dtype)).astype(np.float64)
    return np.abs(f64(got) - f64(true)) / spacing


def normal(true, dtype=np.float32) -> np.ndarray:
    """Where ``true`` is in ``dtype``'s normal range (XLA on CPU flushes subnormals)."""
    a = np.abs(f64(true))
    return (a >= np.finfo(dtype).tiny) & (a <= np.finfo(dtype).max)
