"""The element-wise BCE kernels: one table of formulations, one factory of custom_jvps.

A kernel ``k(z, y, pw)`` takes logits ``z``, labels ``y`` and an optional ``pos_weight``
``pw``, already checked, masked and broadcast to one shape in the compute dtype, and
returns ``(1 - y) softplus(z) + pw y softplus(-z)`` element-wise. Its JVP rule gives the
``p - y`` gradient directly. Each kernel holds two formulations of the same math, and
``jax.lax.platform_dependent`` picks one when lowering:

* :data:`CPU`: written for XLA:CPU, whose reduction fusion (YNNPACK) takes the loss
  whole while the gradient runs in one multithreaded loop fusion;
* :data:`FORMULATIONS`, for GPU and TPU, by (hard labels, 16-bit logits): loss and
  gradient share one ``exp(-|z|)`` and XLA fuses them and the reduction into one kernel.

:data:`KERNELS` holds the kernel of each table entry; :func:`kernel_for` picks one.
Tests and benchmarks iterate over the same table.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbce import _elementwise as ew

Fn = Callable[[jax.Array, jax.Array, "jax.Array | None"], jax.Array]


class Formulation(NamedTuple):
    """One way to compute a kernel's loss and its gradient w.r.t. the logits."""

    name: str
    loss: Fn
    grad: Fn


# --------------------------------------------------------------- GPU and TPU


def _loss_fused(z, y, pw, *, narrow: bool):
    """The loss from the same ``e = exp(-|z|)`` as :func:`_grad_fused`.

    16-bit logits (``narrow``) take the polynomial ``log1p`` and ``max(+-z, 0)`` as
    maxima (their results are rounded to 8 or 11 bits).
    """
    e = jnp.exp(ew.neg_abs(z))
    lg = ew.log1p_unit(e) if narrow else jnp.log1p(e)
    a, b = ew.coefficients(y, pw)
    base = lg if pw is None else (a + b) * lg
    relu_z, relu_neg_z = ew.relus_max(z) if narrow else ew.relus(z)
    return base + ew.times(a, relu_z) + ew.times(b, relu_neg_z)


def _recip(u, narrow: bool):
    return ew.recip_unit(u) if narrow else 1 / u


def _grad_fused(z, y, pw, *, narrow: bool):
    """``(1 - y) sigmoid(z) - pw y sigmoid(-z)`` sharing ``exp(-|z|)`` with the loss."""
    e = jnp.exp(ew.neg_abs(z))
    a, b = ew.coefficients(y, pw)
    s_pos, s_neg = ew.sigmoids(z, e, _recip(1 + e, narrow))
    return a * s_pos - b * s_neg


def _loss_hard(z, y, pw, *, narrow: bool):
    """The loss for labels known to be 0 or 1: ``softplus(t)``, t = z (y = 0) or -z.

    ``log1p(e) + (|z| if t > 0 else 0)``: one select, and infinite logits need no
    special case (the unused softplus is never formed). ``log1p`` must stay one op:
    ``log(u) + (e - (u - 1)) / u`` loses its correction once XLA folds ``(1 + e) - 1``.
    """
    pos = y != 0
    wrong = pos != (z >= 0)  # z on the wrong side of 0 for the label
    e = jnp.exp(ew.neg_abs(z))
    loss = jnp.where(wrong, jnp.abs(z), jnp.zeros((), z.dtype))
    loss = loss + (ew.log1p_unit(e) if narrow else jnp.log1p(e))
    return loss if pw is None else jnp.where(pos, pw * loss, loss)


def _grad_hard(z, y, pw, *, narrow: bool):
    """``sigmoid(z)`` for negatives, ``-pw sigmoid(-z)`` for positives."""
    pos = y != 0
    wrong = pos != (z >= 0)
    e = jnp.exp(ew.neg_abs(z))
    r = _recip(1 + e, narrow)
    s = jnp.where(wrong, r, e * r)  # sigmoid(t), no cancellation
    return jnp.where(pos, -(s if pw is None else pw * s), s)


# ----------------------------------------------------------------------- CPU


def _loss_cpu(z, y, pw):
    """The loss in ops that XLA:CPU's reduction fusion (YNNPACK) takes whole: no select.

    A hard label's unused term must be exactly 0 also at an infinite logit. Instead of
    a select, ``z`` is clipped to the largest finite value exactly where that term's
    coefficient is 0: ``big / |y|`` is finite only at |y| = 1, and
    ``-big - big min(|b| big, 1)`` only at b = 0. ``max(y, -big)`` changes no label but
    keeps XLA from turning ``y * x`` into a select for a converted bool, and ``-0.0``
    keeps the constant distinct from the gradient fusion's 0. YNNPACK's min and max
    drop NaN, so NaN reaches the result through arithmetic alone.
    """
    big = jnp.finfo(z.dtype).max
    a = 1 - y
    y_b = jnp.maximum(y, -big)
    b = y_b if pw is None else pw * y_b
    lg = jnp.log1p(jnp.exp(-jnp.abs(z)))
    if pw is not None:
        lg = (a + b) * lg
    hi = big / jnp.abs(y_b)
    lo = -big - big * jnp.minimum(jnp.abs(b) * big, 1)
    zc = jnp.minimum(jnp.maximum(z, lo), hi)
    return lg + (a * jnp.maximum(zc, -0.0) - b * jnp.minimum(zc, -0.0))


def _grad_cpu(z, y, pw):
    """The gradient of :func:`_grad_fused`, sharing no op (not even a broadcast
    constant) with :func:`_loss_cpu`: an op that two XLA:CPU fusions read is
    materialized as an N-sized array. Hence ``-1 / (-1 - e)`` for ``1 / (1 + e)``,
    ``-((y - 1) s)`` for ``(1 - y) s`` (exact for y >= 1/2, also unfused) and
    ``y (2 pw s) / 2`` for ``pw y s``.
    """
    pos = z >= 0
    e = jnp.exp(jnp.where(pos, -z, z))
    r = -1 / (-1 - e)  # sigmoid(|z|)
    s_pos, s_neg = ew.sigmoids(z, e, r)
    neg_a_s = (y + (-1.0)) * s_pos
    if pw is None:
        return -neg_a_s - y * s_neg
    return -neg_a_s - (y * ((2 * pw) * s_neg)) * 0.5


# --------------------------------------------------------------------- table

CPU = Formulation("cpu", _loss_cpu, _grad_cpu)


def _gpu(name, loss, grad, narrow):
    return Formulation(
        name, functools.partial(loss, narrow=narrow), functools.partial(grad, narrow=narrow)
    )


# GPU and TPU, by (hard labels, 16-bit logits).
FORMULATIONS: dict[tuple[bool, bool], Formulation] = {
    (False, False): _gpu("fused", _loss_fused, _grad_fused, False),
    (True, False): _gpu("hard", _loss_hard, _grad_hard, False),
    (False, True): _gpu("fused-narrow", _loss_fused, _grad_fused, True),
    (True, True): _gpu("hard-narrow", _loss_hard, _grad_hard, True),
}


def _per_platform(cpu: Fn, default: Fn, z, y, pw):
    """``cpu(z, y, pw)`` when compiled for CPU, else ``default(z, y, pw)``: the branch
    is picked when lowering, so the compiled code holds only one."""
    if pw is None:
        return jax.lax.platform_dependent(
            z, y, cpu=lambda z, y: cpu(z, y, None), default=lambda z, y: default(z, y, None)
        )
    return jax.lax.platform_dependent(z, y, pw, cpu=cpu, default=default)


def make_kernel(form: Formulation, cpu: Formulation = CPU):
    """The custom_jvp kernel computing ``form`` on GPU/TPU and ``cpu`` on CPU."""

    @jax.custom_jvp
    def kernel(z: jax.Array, y: jax.Array, pw: jax.Array | None) -> jax.Array:
        return _per_platform(cpu.loss, form.loss, z, y, pw)

    # The rule: the gradient w.r.t. z from the formulation (no autodiff through
    # log1p/exp), d/dy = pw softplus(-z) - softplus(z) (-z exactly when pw is None),
    # d/dpw = y softplus(-z); jnp ops only, so it differentiates again; symbolic
    # zeros skip what is not differentiated.
    @functools.partial(kernel.defjvp, symbolic_zeros=True)
    def _rule(primals, tangents):
        z, y, pw = primals
        dz, dy, dpw = tangents
        out = kernel(z, y, pw)
        terms = []
        if not ew.is_zero(dz):
            terms.append(_per_platform(cpu.grad, form.grad, z, y, pw) * dz)
        if not ew.is_zero(dy) or (pw is not None and not ew.is_zero(dpw)):
            _, lg = ew.log1p_exp_neg_abs(z)
            relu_z, relu_neg_z = ew.relus(z)
        if not ew.is_zero(dy):
            d_y = -z if pw is None else (pw - 1) * lg + ew.times(pw, relu_neg_z) - relu_z
            terms.append(d_y * dy)
        if pw is not None and not ew.is_zero(dpw):
            terms.append(ew.times(y, lg + relu_neg_z) * dpw)
        return out, ew.add_tangents(terms, out)

    kernel.__name__ = kernel.__qualname__ = f"bce_{form.name.replace('-', '_')}"
    return kernel


KERNELS = {key: make_kernel(form) for key, form in FORMULATIONS.items()}

# The general kernel: any labels in [0, 1], 32-bit logits.
bce_with_logits = KERNELS[False, False]


def kernel_for(hard: bool, narrow: bool):
    """The kernel for hard labels (bool/int, unsmoothed) and/or 16-bit logits."""
    return KERNELS[bool(hard), bool(narrow)]


def value_and_dz(kernel, z: jax.Array, y: jax.Array, pw: jax.Array | None):
    """A kernel's loss and its derivative in ``z`` (the rule's, one jvp: XLA computes
    the shared ``exp`` once)."""
    return jax.jvp(lambda z: kernel(z, y, pw), (z,), (jnp.ones_like(z),))


# ---------------------------------------------------------- BCE on probabilities

# PyTorch clamps each log term of BCELoss at -100 so that p = 0 or 1 gives a finite loss,
# and its backward divides by max(p (1 - p), 1e-12).
LOG_CLAMP = -100.0
PROB_EPS = 1e-12


def _log1m(p: jax.Array) -> jax.Array:
    """``log(1 - p)``. XLA's float64 log1p on CPU is off by up to 128 ulp in
    (-0.45, -0.35); there ``1 - p`` is exact or nearly so and ``log`` is accurate."""
    if p.dtype == jnp.float64:
        return jnp.where(p < 0.25, jnp.log1p(-p), jnp.log(1 - p))
    return jnp.log1p(-p)


def _clamped_logs(p: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.maximum(jnp.log(p), LOG_CLAMP), jnp.maximum(_log1m(p), LOG_CLAMP)


@jax.custom_jvp
def bce_on_probs(p: jax.Array, y: jax.Array) -> jax.Array:
    """Element-wise ``-(y max(log p, -100) + (1 - y) max(log(1 - p), -100))``.

    Derivatives, as PyTorch's BCELoss: d/dp = (p - y) / max(p (1 - p), 1e-12), finite
    at p = 0 and 1; d/dy = max(log(1 - p), -100) - max(log p, -100).
    """
    log_p, log_q = _clamped_logs(p)
    return -(y * log_p + (1 - y) * log_q)


@functools.partial(bce_on_probs.defjvp, symbolic_zeros=True)
def _bce_on_probs_jvp(primals, tangents):
    p, y = primals
    dp, dy = tangents
    out = bce_on_probs(p, y)
    terms = []
    if not ew.is_zero(dp):
        terms.append((p - y) / jnp.maximum(p * (1 - p), PROB_EPS) * dp)
    if not ew.is_zero(dy):
        log_p, log_q = _clamped_logs(p)
        terms.append((log_q - log_p) * dy)
    return out, ew.add_tangents(terms, out)
