"""Element-wise BCE kernels under ``jax.custom_jvp``.

All inputs here are already checked, masked and broadcast to one shape in the
compute dtype (float32 or float64). Every kernel is one pass of element-wise
math that XLA fuses with its gradient into a single kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def _is_zero(t) -> bool:
    return t is None or isinstance(t, SymbolicZero)


def _log1p_exp_neg_abs(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns ``e = exp(-|z|)`` and ``log1p(e)``, the shared part of both softplus terms.

    ``-|z|`` is written as a select so that its derivative at z = 0 is -1 (the z >= 0
    branch) rather than sign(0) = 0: the gradient's own derivative (the Hessian) stays
    right at exactly zero.
    """
    e = jnp.exp(jnp.where(z >= 0, -z, z))
    return e, jnp.log1p(e)


def _sigmoids(z: jax.Array, e: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``sigmoid(z)`` and ``sigmoid(-z)`` from one shared ``e = exp(-|z|)``, no cancellation."""
    r = 1 / (1 + e)  # sigmoid(|z|)
    er = e * r  # sigmoid(-|z|), exact to rounding even where it is tiny
    pos = z >= 0
    return jnp.where(pos, r, er), jnp.where(pos, er, r)


def _coefficients(y, pw):
    """Weights of softplus(z) and softplus(-z): ``1 - y`` and ``pos_weight * y``."""
    return 1 - y, (y if pw is None else pw * y)


def _times(c: jax.Array, x: jax.Array) -> jax.Array:
    """``c * x`` with 0 * inf = 0: a hard label's unused term is exactly zero.

    Only the inf is replaced, so the derivative w.r.t. ``c`` stays ``x`` at c = 0.
    """
    return c * jnp.where((c == 0) & jnp.isinf(x), jnp.zeros((), x.dtype), x)


def _relus(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``max(z, 0)`` and ``max(-z, 0)`` with the same z >= 0 branch as ``exp(-|z|)``, so

    that derivatives of their sums with ``log1p(exp(-|z|))`` are right at z = 0.
    """
    pos = z >= 0
    zero = jnp.zeros((), z.dtype)
    return jnp.where(pos, z, zero), jnp.where(pos, zero, -z)


@jax.custom_jvp
def bce_with_logits(z: jax.Array, y: jax.Array, pw: jax.Array | None) -> jax.Array:
    r"""Element-wise ``(1 - y) softplus(z) + pw y softplus(-z)``.

    With ``e = exp(-|z|)`` and ``l = log1p(e)``, ``softplus(z) = max(z, 0) + l`` and
    ``softplus(-z) = max(-z, 0) + l``; all terms are non-negative for labels in [0, 1],
    so their sum has no cancellation. Hard labels drop the unused term exactly, which
    makes the loss 0 at (z = +inf, y = 1) and (z = -inf, y = 0), and +inf on the wrong
    side of an infinite logit or for any soft label there.

    Derivatives (the rule below): d/dz = (1 - y) sigmoid(z) - pw y sigmoid(-z), both
    sigmoids from the same ``e``; d/dy = pw softplus(-z) - softplus(z), which is -z
    exactly when pw is None; d/dpw = y softplus(-z).
    """
    e, lg = _log1p_exp_neg_abs(z)
    a, b = _coefficients(y, pw)
    base = lg if pw is None else (a + b) * lg
    relu_z, relu_neg_z = _relus(z)
    return base + _times(a, relu_z) + _times(b, relu_neg_z)


# The rule gives the p - y gradient directly (no autodiff through log1p/exp), is
# written in jnp ops so that it differentiates again (Hessians), and skips the work
# for arguments that are not differentiated (symbolic zeros).
def _bce_with_logits_jvp(primals, tangents):
    z, y, pw = primals
    dz, dy, dpw = tangents
    out = bce_with_logits(z, y, pw)
    e, lg = _log1p_exp_neg_abs(z)
    relu_z, relu_neg_z = _relus(z)
    terms = []
    if not _is_zero(dz):
        a, b = _coefficients(y, pw)
        s_pos, s_neg = _sigmoids(z, e)
        terms.append((a * s_pos - b * s_neg) * dz)
    if not _is_zero(dy):
        if pw is None:
            d_y = -z
        else:
            d_y = (pw - 1) * lg + _times(pw, relu_neg_z) - relu_z
        terms.append(d_y * dy)
    if pw is not None and not _is_zero(dpw):
        terms.append(_times(y, lg + relu_neg_z) * dpw)
    if not terms:
        return out, jnp.zeros_like(out)
    tangent = terms[0]
    for t in terms[1:]:
        tangent = tangent + t
    return out, tangent


bce_with_logits.defjvp(_bce_with_logits_jvp, symbolic_zeros=True)

# PyTorch clamps each log term of BCELoss at -100 so that p = 0 or 1 gives a finite loss.
LOG_CLAMP = -100.0
# PyTorch's BCELoss backward divides by max(p (1 - p), 1e-12).
PROB_EPS = 1e-12


def _log1m(p: jax.Array) -> jax.Array:
    """``log(1 - p)``. XLA's float64 log1p on CPU is off by up to 128 ulp for arguments in

    (-0.45, -0.35) (measured, jax 0.10.2); there ``1 - p`` is exact or nearly so and
    ``log`` is accurate. float32 log1p is accurate everywhere, so it keeps the one op.
    """
    if p.dtype == jnp.float64:
        return jnp.where(p < 0.25, jnp.log1p(-p), jnp.log(1 - p))
    return jnp.log1p(-p)


@jax.custom_jvp
def bce_on_probs(p: jax.Array, y: jax.Array) -> jax.Array:
    """Element-wise ``-(y max(log p, -100) + (1 - y) max(log(1 - p), -100))``.

    Derivatives (the rule below), as PyTorch's BCELoss: d/dp = (p - y) / max(p (1 - p),
    1e-12), finite at p = 0 and p = 1; d/dy = max(log(1 - p), -100) - max(log p, -100).
    """
    log_p = jnp.maximum(jnp.log(p), LOG_CLAMP)
    log_q = jnp.maximum(_log1m(p), LOG_CLAMP)
    return -(y * log_p + (1 - y) * log_q)


def _bce_on_probs_jvp(primals, tangents):
    p, y = primals
    dp, dy = tangents
    out = bce_on_probs(p, y)
    tangent = jnp.zeros_like(out)
    if not _is_zero(dp):
        tangent = tangent + (p - y) / jnp.maximum(p * (1 - p), PROB_EPS) * dp
    if not _is_zero(dy):
        log_p = jnp.maximum(jnp.log(p), LOG_CLAMP)
        log_q = jnp.maximum(_log1m(p), LOG_CLAMP)
        tangent = tangent + (log_q - log_p) * dy
    return out, tangent


bce_on_probs.defjvp(_bce_on_probs_jvp, symbolic_zeros=True)
