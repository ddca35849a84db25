"""Element-wise BCE kernels under ``jax.custom_jvp``.

All inputs here are already checked, masked and broadcast to one shape in the
compute dtype (float32 or float64). Every kernel is element-wise math that XLA fuses
with its gradient: into a single kernel on GPU; on CPU ``bce_with_logits`` takes a
formulation of its own (``_loss_cpu``, ``_grad_cpu``) that XLA:CPU splits into its
YNNPACK reduction and one multithreaded loop fusion (docs/performance.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def _is_zero(t) -> bool:
    return t is None or isinstance(t, SymbolicZero)


# q(x) = (log1p(x) - x) / x**2 on [0, 1], degree 7: the coefficients minimise the largest
# relative error of x + x**2 q(x) (scripts/fit_log1p.py fits them and measures the result).
_LOG1P_Q = (
    -0.49999648332595825,
    0.333213210105896,
    -0.24857161939144135,
    0.19153647124767303,
    -0.1375378668308258,
    0.07920434325933456,
    -0.03006567433476448,
    0.005364794749766588,
)


def _log1p_unit(x: jax.Array, q: tuple[float, ...] = _LOG1P_Q) -> jax.Array:
    r"""``log1p(x)`` for x in [0, 1] (NaN for NaN) in nine multiply-adds.

    .. math:: \log(1 + x) = x + x^2 q(x)

    with a degree-7 polynomial ``q`` in Horner form. It is within 1.81 float32 ulp of the
    true value on [0, 1] with fused multiply-adds (2.16 without); XLA's ``log1p`` on a
    GPU is a general-purpose library call with range reduction and special cases, about
    twice the instructions, and more accurate (2.3 rather than 2.9 ulp in the loss).
    The kernels for 16-bit logits use it, whose results are rounded to 8 or 11 bits:
    their loss + gradient is bound by instruction count, not memory. Float64 (anything
    but float32) takes ``jnp.log1p``. ``q``: the polynomial's coefficients, lowest degree
    first (benchmarks/formulations.py tries lower degrees).
    """
    if x.dtype != jnp.float32:
        return jnp.log1p(x)
    p = jnp.full((), q[-1], x.dtype)
    for c in q[-2::-1]:
        p = p * x + c
    return x + (x * x) * p


def _recip(u: jax.Array) -> jax.Array:
    """``1 / u``: a division."""
    return 1 / u


def _recip_unit(u: jax.Array) -> jax.Array:
    r"""``1 / u`` for u in [1, 2] as ``rsqrt(u)**2``, for the kernels of 16-bit logits.

    On a GPU ``rsqrt`` is one special-function instruction (and a range check), where a
    division takes about seven. The kernels' gradients are then within 5.3 float32 ulp
    on an H100 (3.5 with the division) and 3.8 on CPU; they are rounded to 8 or 11
    bits, and over every finite bfloat16 logit the rounded gradient is the correctly
    rounded one, as with the division (tests/test_accuracy.py,
    benchmarks/formulations.py). Float64 (anything but float32) divides.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxbce._core import _recip_unit
        >>> u = jnp.array([1.0, 1.5, 2.0])
        >>> bool(jnp.allclose(_recip_unit(u), 1 / u, rtol=1e-6))
        True
    """
    if u.dtype != jnp.float32:
        return 1 / u
    r = jax.lax.rsqrt(u)
    return r * r


@jax.custom_jvp
def _neg_abs(z: jax.Array) -> jax.Array:
    """``-|z|``, whose derivative at z = 0 is -1 (the z >= 0 side) rather than 0.

    On the GPU ``-|z|`` is free (an operand modifier of the next instruction), where the
    select ``where(z >= 0, -z, z)`` costs a comparison and a select; the rule keeps the
    select's derivative, so that the gradient's own derivative (the Hessian) is right at
    exactly zero.
    """
    return -jnp.abs(z)


@_neg_abs.defjvp
def _neg_abs_jvp(primals, tangents):
    (z,), (dz,) = primals, tangents
    return _neg_abs(z), jnp.where(z >= 0, -dz, dz)


def _log1p_exp_neg_abs(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns ``e = exp(-|z|)`` and ``log1p(e)``, the shared part of both softplus terms.

    ``-|z|`` is written as a select so that its derivative at z = 0 is -1 (the z >= 0
    branch) rather than sign(0) = 0: the gradient's own derivative (the Hessian) stays
    right at exactly zero. (The GPU kernels write it as :func:`_neg_abs`, which XLA:CPU
    fuses less well in the sparse loss.)
    """
    e = jnp.exp(jnp.where(z >= 0, -z, z))
    return e, jnp.log1p(e)


def _sigmoids(z: jax.Array, e: jax.Array, recip=_recip) -> tuple[jax.Array, jax.Array]:
    """``sigmoid(z)`` and ``sigmoid(-z)`` from one shared ``e = exp(-|z|)``, no cancellation."""
    r = recip(1 + e)  # sigmoid(|z|)
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


def _relus_max(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``max(z, 0)`` and ``max(-z, 0)`` as two maxima that share no comparison.

    For loss values only (the custom_jvp rules give the derivatives). With the selects
    of :func:`_relus`, XLA on a GPU stored ``z >= 0`` as a byte per element in a kernel
    of its own when no gradient was asked for (bfloat16 logits with float32 labels ran
    at 58% of copy speed, 0.59x optax; benchmarks/results/gpu/formulations/run6-fwd.log).
    """
    zero = jnp.zeros((), z.dtype)
    return jnp.maximum(z, zero), jnp.maximum(-z, zero)


def _loss_fused(
    z: jax.Array, y: jax.Array, pw: jax.Array | None, log1p=jnp.log1p, relus=_relus
) -> jax.Array:
    """The loss from the same ``e = exp(-|z|)`` as :func:`_grad_fused` (GPU, TPU)."""
    e = jnp.exp(_neg_abs(z))
    lg = log1p(e)
    a, b = _coefficients(y, pw)
    base = lg if pw is None else (a + b) * lg
    relu_z, relu_neg_z = relus(z)
    return base + _times(a, relu_z) + _times(b, relu_neg_z)


def _grad_fused(z: jax.Array, y: jax.Array, pw: jax.Array | None, recip=_recip) -> jax.Array:
    """``(1 - y) sigmoid(z) - pw y sigmoid(-z)`` sharing ``exp(-|z|)`` with the loss."""
    e = jnp.exp(_neg_abs(z))
    a, b = _coefficients(y, pw)
    s_pos, s_neg = _sigmoids(z, e, recip)
    return a * s_pos - b * s_neg


def _hard_parts(z: jax.Array, y: jax.Array, recip=_recip):
    """Shared by :func:`_loss_hard` and :func:`_grad_hard` (XLA computes them once).

    ``pos = y != 0``; ``wrong``: z is on the wrong side of 0 for the label (z >= 0 for a
    negative, z < 0 for a positive), where the loss is ``|z| + log1p(e)`` rather than
    ``log1p(e)``; ``e = exp(-|z|)`` (the z >= 0 branch at 0, :func:`_neg_abs`);
    ``r = 1 / (1 + e)`` (from ``recip``).
    """
    pos = y != 0
    wrong = pos != (z >= 0)
    e = jnp.exp(_neg_abs(z))
    return pos, wrong, e, recip(1 + e)


def _loss_hard(z: jax.Array, y: jax.Array, pw: jax.Array | None, log1p=jnp.log1p) -> jax.Array:
    """The loss for labels known to be 0 or 1 (bool or integer labels; GPU, TPU).

    ``softplus(t)`` with ``t = z`` for negatives and ``-z`` for positives, as
    ``log1p(e) + (|z| if t > 0 else 0)``: one select, and infinite logits need no special
    case (the unused softplus is never formed, so there is no 0 * inf to guard against).
    (``log(u) + (e - (u - 1)) / u`` would be cheaper on the GPU, but XLA's simplifier folds
    ``(1 + e) - 1`` to ``e`` and with it the correction: tests/test_accuracy.py.)
    """
    pos, wrong, e, _ = _hard_parts(z, y)
    loss = jnp.where(wrong, jnp.abs(z), jnp.zeros((), z.dtype)) + log1p(e)
    return loss if pw is None else jnp.where(pos, pw * loss, loss)


def _grad_hard(z: jax.Array, y: jax.Array, pw: jax.Array | None, recip=_recip) -> jax.Array:
    """``sigmoid(z)`` for negatives, ``-pw sigmoid(-z)`` for positives: ``+-sigmoid(t)``."""
    pos, wrong, e, r = _hard_parts(z, y, recip)
    s = jnp.where(wrong, r, e * r)  # sigmoid(t), no cancellation
    return jnp.where(pos, -(s if pw is None else pw * s), s)


def _loss_cpu(z: jax.Array, y: jax.Array, pw: jax.Array | None) -> jax.Array:
    """The loss in ops that XLA:CPU's reduction fusion (YNNPACK) takes whole: no select.

    Each hard label's unused term must be exactly 0 also at an infinite logit, where the
    product would be 0 * inf = NaN. Instead of a select, ``z`` is clipped to the largest
    finite value exactly where that term's coefficient is 0 (and nowhere else):
    ``big / |y|`` is finite only at |y| = 1 (a label below 1 is at most 1 - 2**-24, and
    big / (1 - 2**-24) overflows), and ``-big - big min(|b| big, 1)`` only at b = 0
    (|b| big >= 4.8e-7 for every nonzero float32, 8.8e-16 for float64, enough to overflow).

    ``max(y, -big)`` changes no label; it keeps XLA from rewriting ``y * x`` into a select
    when ``y`` is a converted bool, and the ``-0.0`` in ``max(zc, -0.0)`` keeps the
    constant distinct from the 0 of those selects in the gradient's fusion. YNNPACK's
    min and max drop a NaN operand (XLA's propagate it), so NaN reaches the result
    through arithmetic alone: ``log1p`` for a NaN logit, ``a = 1 - y`` (from the label
    itself) for a NaN label, ``b`` for a NaN ``pw``.
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


def _grad_cpu(z: jax.Array, y: jax.Array, pw: jax.Array | None) -> jax.Array:
    """``(1 - y) sigmoid(z) - pw y sigmoid(-z)`` as XLA:CPU's loop fusion computes it fast.

    The same math as :func:`_grad_fused`, written to share no instruction with
    :func:`_loss_cpu`, not even a broadcast constant: XLA:CPU cannot hand an op that two
    fusions read to the loss's reduction fusion, so it would materialize it (an N-sized
    array). Hence ``-1 / (-1 - e)`` for ``1 / (1 + e)``, ``-((y - 1) s)`` for
    ``(1 - y) s`` and ``y (2 pw s) / 2`` for ``(pw y) s``.
    """
    pos = z >= 0
    e = jnp.exp(jnp.where(pos, -z, z))
    r = -1 / (-1 - e)  # sigmoid(|z|)
    er = e * r  # sigmoid(-|z|)
    s_pos, s_neg = jnp.where(pos, r, er), jnp.where(pos, er, r)
    # (1 - y) s_pos as -((y + (-1)) s_pos): y - 1 is exact for y >= 1/2, so there is no
    # cancellation near y = 1 even where XLA does not fuse it into a multiply-add (eager
    # calls), and it shares no instruction or constant with the loss's 1 - y.
    neg_a_s = (y + (-1.0)) * s_pos
    if pw is None:
        return -neg_a_s - y * s_neg
    # 2 pw is a broadcast of its own (XLA folds the scalar into it), so the loss keeps
    # pw's broadcast to itself; the exact * 0.5 undoes the 2.
    return -neg_a_s - (y * ((2 * pw) * s_neg)) * 0.5


def _per_platform(cpu, default, z, y, pw):
    """``cpu(z, y, pw)`` where the code is compiled for CPU, else ``default(z, y, pw)``.

    ``jax.lax.platform_dependent`` picks the branch when lowering, so the compiled code
    holds only one (no conditional, nothing in the way of fusion) and both differentiate
    like any jnp code.
    """
    if pw is None:
        return jax.lax.platform_dependent(
            z, y, cpu=lambda z, y: cpu(z, y, None), default=lambda z, y: default(z, y, None)
        )
    return jax.lax.platform_dependent(z, y, pw, cpu=cpu, default=default)


def _bce_rule(fn, grad_cpu, grad_default):
    """The JVP rule of :func:`bce_with_logits` and :func:`bce_with_logits_hard`.

    It gives the p - y gradient directly (``grad_*``, no autodiff through log1p/exp), is
    written in jnp ops so that it differentiates again (Hessians), and skips the work for
    arguments that are not differentiated (symbolic zeros).
    """

    def rule(primals, tangents):
        z, y, pw = primals
        dz, dy, dpw = tangents
        out = fn(z, y, pw)
        terms = []
        if not _is_zero(dz):
            terms.append(_per_platform(grad_cpu, grad_default, z, y, pw) * dz)
        if not _is_zero(dy) or (pw is not None and not _is_zero(dpw)):
            _, lg = _log1p_exp_neg_abs(z)
            relu_z, relu_neg_z = _relus(z)
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

    return rule


@jax.custom_jvp
def bce_with_logits(z: jax.Array, y: jax.Array, pw: jax.Array | None) -> jax.Array:
    r"""Element-wise ``(1 - y) softplus(z) + pw y softplus(-z)``.

    With ``e = exp(-|z|)`` and ``l = log1p(e)``, ``softplus(z) = max(z, 0) + l`` and
    ``softplus(-z) = max(-z, 0) + l``; all terms are non-negative for labels in [0, 1],
    so their sum has no cancellation. Hard labels drop the unused term exactly, which
    makes the loss 0 at (z = +inf, y = 1) and (z = -inf, y = 0), and +inf on the wrong
    side of an infinite logit or for any soft label there.

    Derivatives (the rule below): d/dz = (1 - y) sigmoid(z) - pw y sigmoid(-z), both
    sigmoids from one ``e``; d/dy = pw softplus(-z) - softplus(z), which is -z exactly
    when pw is None; d/dpw = y softplus(-z).

    The same math has two formulations, chosen per backend when lowering: on GPU and TPU
    the loss and gradient share one ``exp`` (XLA fuses loss, reduction and gradient into
    one kernel); on CPU the loss is select-free and shares nothing with the gradient, so
    that XLA:CPU's YNNPACK reduction fusion computes it whole while the gradient runs in
    a multithreaded loop fusion (docs/performance.md).
    """
    return _per_platform(_loss_cpu, _loss_fused, z, y, pw)


bce_with_logits.defjvp(_bce_rule(bce_with_logits, _grad_cpu, _grad_fused), symbolic_zeros=True)


@jax.custom_jvp
def bce_with_logits_hard(z: jax.Array, y: jax.Array, pw: jax.Array | None) -> jax.Array:
    """:func:`bce_with_logits` for labels that are exactly 0 or 1 (from bool or integer
    labels, no label smoothing): the same values and derivatives, with fewer operations
    per element on GPU and TPU (:func:`_loss_hard`, :func:`_grad_hard`), which is what
    bf16 logits with one-byte labels need to stay memory-bound there. On CPU it is
    :func:`bce_with_logits`'s own CPU formulation.
    """
    return _per_platform(_loss_cpu, _loss_hard, z, y, pw)


bce_with_logits_hard.defjvp(
    _bce_rule(bce_with_logits_hard, _grad_cpu, _grad_hard), symbolic_zeros=True
)


@jax.custom_jvp
def bce_with_logits_narrow(z: jax.Array, y: jax.Array, pw: jax.Array | None) -> jax.Array:
    """:func:`bce_with_logits` for logits that were 16-bit (bfloat16, float16) before
    their conversion to float32. On GPU and TPU ``log1p`` is :func:`_log1p_unit` (within
    3 float32 ulp, where XLA's is within 2.4) and the gradient's ``1 / (1 + e)`` is
    :func:`_recip_unit` (within 5.3 ulp rather than 3.5): the results are rounded to the
    logits' 8 or 11 bits, and over every finite 16-bit logit they round as the float32
    kernels' do but for a handful of ties (tests/test_accuracy.py). The loss takes its
    ``max(+-z, 0)`` from :func:`_relus_max`. On CPU it is :func:`bce_with_logits`.
    """
    loss = functools.partial(_loss_fused, log1p=_log1p_unit, relus=_relus_max)
    return _per_platform(_loss_cpu, loss, z, y, pw)


bce_with_logits_narrow.defjvp(
    _bce_rule(bce_with_logits_narrow, _grad_cpu, functools.partial(_grad_fused, recip=_recip_unit)),
    symbolic_zeros=True,
)


@jax.custom_jvp
def bce_with_logits_hard_narrow(z: jax.Array, y: jax.Array, pw: jax.Array | None) -> jax.Array:
    """:func:`bce_with_logits_hard` for 16-bit logits, with :func:`_log1p_unit` and
    :func:`_recip_unit` on GPU and TPU (see :func:`bce_with_logits_narrow`): bfloat16
    logits with one-byte labels (5 bytes per element) are bound by instructions and
    memory latency there, not by bandwidth."""
    return _per_platform(_loss_cpu, functools.partial(_loss_hard, log1p=_log1p_unit), z, y, pw)


bce_with_logits_hard_narrow.defjvp(
    _bce_rule(
        bce_with_logits_hard_narrow, _grad_cpu, functools.partial(_grad_hard, recip=_recip_unit)
    ),
    symbolic_zeros=True,
)


def kernel_for(hard: bool, narrow: bool):
    """The element-wise kernel for hard (bool/int, unsmoothed) labels and/or 16-bit logits."""
    if hard:
        return bce_with_logits_hard_narrow if narrow else bce_with_logits_hard
    return bce_with_logits_narrow if narrow else bce_with_logits


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


@functools.partial(bce_on_probs.defjvp, symbolic_zeros=True)
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
