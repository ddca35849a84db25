"""The element-wise BCE kernels: one table of formulations, one factory of custom_jvps.

A kernel ``k(z, y, pw)`` takes logits ``z``, labels ``y`` and an optional ``pos_weight``
``pw``, already checked, masked and broadcast to one shape, and returns
``(1 - y) softplus(z) + pw y softplus(-z)`` element-wise in the compute dtype. ``z`` and
``y`` may come in their own dtypes (16-bit logits; bool, integer or 16-bit labels,
integers nonzero for positives) or already in the compute dtype; ``pw`` is in the
compute dtype. Its JVP rule gives the ``p - y`` gradient directly. Each kernel holds two
formulations of the same math, and ``jax.lax.platform_dependent`` picks one when
lowering:

* :data:`CPU` (:data:`CPU_HARD` for hard labels): written for XLA:CPU, whose reduction
  fusion (YNNPACK) takes the loss whole while the gradient runs in one multithreaded
  loop fusion; each of the two converts the inputs it reads, so that no conversion is
  materialized;
* :data:`FORMULATIONS`, for GPU and TPU, by (hard labels, 16-bit logits): XLA fuses
  loss, reduction and gradient into one kernel. Loss and gradient share no costly op
  in XLA's view (each writes its own ``exp(-|z|)``, which the GPU's machine code
  computes once), so that the fusion does not hang on the cost model's view of the
  device. They get the inputs converted to the compute dtype first
  (:func:`_as_compute`).

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
from jaxbce import _prepare

Fn = Callable[[jax.Array, jax.Array, "jax.Array | None"], jax.Array]


class Formulation(NamedTuple):
    """One way to compute a kernel's loss and its gradient w.r.t. the logits."""

    name: str
    loss: Fn
    grad: Fn


# --------------------------------------------------------------- GPU and TPU
#
# XLA's GPU fusion decides producer by producer, before it merges sibling fusions into
# one kernel. Loss and gradient are two consumers there (a reduction and an element-wise
# output): an ``exp(-|z|)`` they share is a producer XLA either copies into both or
# writes out as an N-sized array, by its cost model, which weighs the copies' math
# against the device's memory bandwidth (for 16-bit logits an H200 wrote it out, an H100
# did not; for float32 logits a B200 computes the gradient in a second kernel). So loss
# and gradient share no costly op: the gradient takes its own ``exp`` of ``-|z|``
# written as a sign bit (``ew.neg_abs_bits``; CSE would merge equal expressions); what
# is left shared (the conversion of the inputs, comparisons) XLA copies freely. After
# fusion, LLVM folds the sign bit back into ``-|z|`` and the kernel's machine code
# computes one ``exp`` (one ``MUFU.EX2`` per element). ``benchmarks/fusion.py`` checks
# the compiled kernels.


def _exp_neg_abs(z):
    """``exp(-|z|)`` for the losses (``-|z|`` is an operand modifier on a GPU)."""
    return jnp.exp(ew.neg_abs(z))


def _exp_neg_abs_apart(z):
    """``exp(-|z|)`` for the gradients: the same bits as :func:`_exp_neg_abs`, another
    expression for XLA, so that it keeps the two apart (see above)."""
    return jnp.exp(ew.neg_abs_bits(z))


def _loss_fused(z, y, pw, *, narrow: bool):
    """The loss ``lg + (1 - y) max(z, 0) + pw y max(-z, 0)``, ``lg = log1p(exp(-|z|))``.

    16-bit logits (``narrow``) take the polynomial ``log1p`` and ``max(+-z, 0)`` as
    maxima (their results are rounded to 8 or 11 bits).
    """
    e = _exp_neg_abs(z)
    lg = ew.log1p_unit(e) if narrow else jnp.log1p(e)
    a, b = ew.coefficients(y, pw)
    base = lg if pw is None else (a + b) * lg
    relu_z, relu_neg_z = ew.relus_max(z) if narrow else ew.relus(z)
    return base + ew.times(a, relu_z) + ew.times(b, relu_neg_z)


def _recip(u, narrow: bool):
    return ew.recip_unit(u) if narrow else 1 / u


def _grad_fused(z, y, pw, *, narrow: bool):
    """``(1 - y) sigmoid(z) - pw y sigmoid(-z)``."""
    e = _exp_neg_abs_apart(z)
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
    e = _exp_neg_abs(z)
    loss = jnp.where(wrong, jnp.abs(z), jnp.zeros((), z.dtype))
    loss = loss + (ew.log1p_unit(e) if narrow else jnp.log1p(e))
    return loss if pw is None else jnp.where(pos, pw * loss, loss)


def _grad_hard(z, y, pw, *, narrow: bool):
    """``sigmoid(z)`` for negatives, ``-pw sigmoid(-z)`` for positives."""
    pos = y != 0
    wrong = pos != (z >= 0)
    e = _exp_neg_abs_apart(z)
    r = _recip(1 + e, narrow)
    s = jnp.where(wrong, r, e * r)  # sigmoid(t), no cancellation
    return jnp.where(pos, -(s if pw is None else pw * s), s)


# ----------------------------------------------------------------------- CPU


def _compute_dtype(z) -> jnp.dtype:
    """The dtype the kernels compute in: float64 for float64 logits, else float32."""
    return _prepare.compute_dtype(jnp.asarray(z).dtype)


def _nonzero(y) -> jax.Array:
    """``y != 0`` (a bool array as it is)."""
    y = jnp.asarray(y)
    return y if y.dtype == jnp.bool_ else y != jnp.zeros((), y.dtype)


def _float_labels(y, dtype) -> jax.Array:
    """Labels in ``dtype``, integer ones as 0 or 1."""
    return _prepare.label_values(jnp.asarray(y)).astype(dtype)


def _as_compute(z, y) -> tuple[jax.Array, jax.Array]:
    """``z`` and ``y`` in the compute dtype: the inputs of the GPU and TPU formulations
    and of the label and pos_weight derivatives."""
    cdt = _compute_dtype(z)
    return jnp.asarray(z).astype(cdt), _float_labels(y, cdt)


def _widen(x, dtype) -> jax.Array:
    """``x.astype(dtype)`` for the CPU gradient, bfloat16 through integer ops.

    A conversion read by both the loss's YNNPACK fusion and the gradient's loop fusion
    is materialized (an N-sized array), and XLA's CSE merges equal ``convert`` ops: so
    the gradient widens bfloat16 its own way (its 16 bits are the high half of the
    float32; exact), with ops YNNPACK's fusion never takes.
    """
    x = jnp.asarray(x)
    if x.dtype == jnp.bfloat16 and dtype == jnp.float32:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16
        return jax.lax.bitcast_convert_type(bits, jnp.float32)
    return x.astype(dtype)


def _loss_cpu(z, y, pw):
    """The loss in ops that XLA:CPU's reduction fusion (YNNPACK) takes whole: no select.

    ``lg + (1 - y) p - b q`` with ``lg = log1p(exp(-|z|))``, ``b = y`` (or ``pw y``),
    ``p = max(z, 0)``, ``q = min(z, 0)``: one of the products is 0, no cancellation.
    An element-wise op costs far more in YNNPACK's fusion than in XLA's loop fusions,
    so this is written for few ops (docs/performance.md).

    A hard label's unused term must be exactly 0 also at an infinite logit. Instead of
    a select, each relu is clipped to the largest finite value exactly where its
    coefficient is 0: ``big / |y|`` is finite only at |y| >= 1 (every label below 1 is
    at most 1 - 2**-24, and big / (1 - 2**-24) overflows), ``-big (1 + 2**104 |b|)``
    only at b = 0 (2**104 |b| >= 2**-22 for every normal b != 0, and the product
    overflows; XLA would fold ``(b big) big`` into ``b inf``). The absolute values keep
    both bounds away from finite logits for labels outside [0, 1] (finite differences).
    In float64 the product overflows for |b| >= 2**-157 only: a smaller float64 label is
    clipped at an infinite logit (a finite loss there, not inf). ``-0.0`` keeps the
    constant distinct from the gradient fusion's 0 (a shared broadcast is materialized).
    YNNPACK's min and max drop NaN, so NaN reaches the result through arithmetic alone:
    ``log1p`` for a NaN logit, ``1 - y`` for a NaN label, ``(1 - y + b) lg`` for a NaN
    ``pw``. The inputs are converted here, inside the fusion.
    """
    cdt = _compute_dtype(z)
    z, y = jnp.asarray(z, cdt), _float_labels(y, cdt)
    big = jnp.finfo(cdt).max
    a = 1 - y
    b = y if pw is None else pw * y
    lg = jnp.log1p(jnp.exp(-jnp.abs(z)))
    if pw is not None:
        lg = (a + b) * lg
    abs_y = jnp.abs(y)
    abs_b = abs_y if pw is None else jnp.abs(b)
    p = jnp.minimum(jnp.maximum(z, -0.0), big / abs_y)
    q = jnp.maximum(jnp.minimum(z, -0.0), (1 + abs_b * 2.0**104) * -big)
    return lg + (a * p - b * q)


def _grad_cpu(z, y, pw):
    """The gradient of :func:`_grad_fused`, sharing no op (not even a broadcast
    constant or a conversion, :func:`_widen`) with :func:`_loss_cpu`: an op that two
    XLA:CPU fusions read is materialized as an N-sized array. Hence ``-1 / (-1 - e)``
    for ``1 / (1 + e)``, ``-((y - 1) s)`` for ``(1 - y) s`` (exact for y >= 1/2, also
    unfused) and ``y (2 pw s) / 2`` for ``pw y s``.
    """
    cdt = _compute_dtype(z)
    z, y = _widen(z, cdt), _widen(_prepare.label_values(jnp.asarray(y)), cdt)
    pos = z >= 0
    e = jnp.exp(jnp.where(pos, -z, z))
    r = -1 / (-1 - e)  # sigmoid(|z|)
    s_pos, s_neg = ew.sigmoids(z, e, r)
    neg_a_s = (y + (-1.0)) * s_pos
    if pw is None:
        return -neg_a_s - y * s_neg
    return -neg_a_s - (y * ((2 * pw) * s_neg)) * 0.5


def _sign_cpu(y, dtype) -> jax.Array:
    """``1 - 2 y`` of hard labels: +1 for a negative, -1 for a positive (nonzero) one.

    int8 and uint8 labels are read by YNNPACK's fusion itself, ``1 - 2 min(|y|, 1)``
    (a ``-1`` constant would be shared with the gradient's and materialized). A bool
    (or wider integer) array cannot be: YNNPACK takes no ``pred`` operand, compare or
    select, and JAX has no bitcast from bool, so XLA first writes the sign as one int8
    per element (a 1-byte temporary where float32 labels would take 4). Float labels
    (0 or 1 here) take ``1 - 2 y``.
    """
    y = jnp.asarray(y)
    if y.dtype in (jnp.int8, jnp.uint8):
        yf = y.astype(dtype)
        if y.dtype == jnp.int8:
            yf = jnp.abs(yf)
        return 1 - 2 * jnp.minimum(yf, 1)
    if y.dtype == jnp.bool_ or jnp.issubdtype(y.dtype, jnp.integer):
        return jnp.where(_nonzero(y), jnp.int8(-1), jnp.int8(1)).astype(dtype)
    return 1 - 2 * y.astype(dtype)


def _loss_cpu_hard(z, y, pw):
    """:func:`_loss_cpu` for labels that are 0 or 1 (bool, integer, or float 0/1).

    ``softplus(c z) = lg + max(c z, 0)`` with ``c = 1 - 2 y = +-1`` (:func:`_sign_cpu`):
    exact and free of NaN at infinite logits (c is never 0), so nothing is clipped, and
    fewer than half the ops of :func:`_loss_cpu`. With ``pw`` the weight
    ``w = max(c, 0) + pw max(-c, 0)`` is 1 or pw exactly (NaN for a NaN pw),
    ``max(c z, 0)`` is clipped where w = 0 (pw = 0, at z = -inf), and
    ``w lg + w max(c z, 0)`` rounds as :func:`_loss_cpu` does on the same labels (the
    same bits).
    """
    cdt = _compute_dtype(z)
    z = jnp.asarray(z, cdt)
    c = _sign_cpu(y, cdt)
    lg = jnp.log1p(jnp.exp(-jnp.abs(z)))
    t = jnp.maximum(c * z, -0.0)
    if pw is None:
        return lg + t
    w = jnp.maximum(c, -0.0) + pw * jnp.maximum(-c, -0.0)
    # pw = 0 drops a positive's term also at z = -inf: t is clipped to the largest
    # finite value exactly where w = 0 (as in _loss_cpu), so that w t = 0 there.
    t = jnp.minimum(t, (1 + jnp.abs(w) * 2.0**104) * jnp.finfo(cdt).max)
    return w * lg + w * t


def _grad_cpu_hard(z, y, pw):
    """``sigmoid(z)`` for negatives, ``-pw sigmoid(-z)`` for positives, in XLA:CPU's
    loop fusion: reads the labels as they come (a bool array as is) and shares no op
    with :func:`_loss_cpu_hard` (as :func:`_grad_cpu`); the same bits as
    :func:`_grad_cpu` on the same labels."""
    z = _widen(z, _compute_dtype(z))
    pos = _nonzero(y)
    neg = z < 0
    e = jnp.exp(jnp.where(neg, z, -z))
    r = -1 / (-1 - e)  # sigmoid(|z|)
    s = jnp.where(pos == neg, r, e * r)  # sigmoid(t): t = |z| on the wrong side
    if pw is None:
        return jnp.where(pos, -s, s)
    return jnp.where(pos, ((-2 * pw) * s) * 0.5, s)


# --------------------------------------------------------------------- table

CPU = Formulation("cpu", _loss_cpu, _grad_cpu)
CPU_HARD = Formulation("cpu-hard", _loss_cpu_hard, _grad_cpu_hard)


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
    """``cpu(z, y, pw)`` when compiled for CPU, else ``default`` of the inputs in the
    compute dtype (:func:`_as_compute`): the branch is picked when lowering, so the
    compiled code holds only one. The CPU formulations convert for themselves."""

    def dflt(z, y, *pw_):
        return default(*_as_compute(z, y), pw_[0] if pw_ else None)

    if pw is None:
        return jax.lax.platform_dependent(z, y, cpu=lambda z, y: cpu(z, y, None), default=dflt)
    return jax.lax.platform_dependent(z, y, pw, cpu=cpu, default=dflt)


def make_kernel(form: Formulation, cpu: Formulation = CPU):
    """The custom_jvp kernel computing ``form`` on GPU/TPU and ``cpu`` on CPU
    (:data:`CPU_HARD` is for labels that are 0 or 1 only)."""

    @jax.custom_jvp
    def kernel(z: jax.Array, y: jax.Array, pw: jax.Array | None) -> jax.Array:
        return _per_platform(cpu.loss, form.loss, z, y, pw)

    # The rule: the gradient w.r.t. z from the formulation (no autodiff through
    # log1p/exp), d/dy = pw softplus(-z) - softplus(z) (-z exactly when pw is None),
    # d/dpw = y softplus(-z); jnp ops only, so it differentiates again; symbolic
    # zeros skip what is not differentiated (bool and integer labels always are).
    @functools.partial(kernel.defjvp, symbolic_zeros=True)
    def _rule(primals, tangents):
        z, y, pw = primals
        dz, dy, dpw = tangents
        out = kernel(z, y, pw)
        terms = []
        if not ew.is_zero(dz):
            g = _per_platform(cpu.grad, form.grad, z, y, pw)
            terms.append(g * dz.astype(out.dtype))
        if not ew.is_zero(dy) or (pw is not None and not ew.is_zero(dpw)):
            zc, yc = _as_compute(z, y)
            _, lg = ew.log1p_exp_neg_abs(zc)
            relu_z, relu_neg_z = ew.relus(zc)
        if not ew.is_zero(dy):
            d_y = -zc if pw is None else (pw - 1) * lg + ew.times(pw, relu_neg_z) - relu_z
            terms.append(d_y * dy.astype(out.dtype))
        if pw is not None and not ew.is_zero(dpw):
            terms.append(ew.times(yc, lg + relu_neg_z) * dpw)
        return out, ew.add_tangents(terms, out)

    kernel.__name__ = kernel.__qualname__ = f"bce_{form.name.replace('-', '_')}"
    return kernel


KERNELS = {
    key: make_kernel(form, CPU_HARD if key[0] else CPU) for key, form in FORMULATIONS.items()
}

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
