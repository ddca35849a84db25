"""Element-wise building blocks of every jaxbce loss.

The contract: every function here takes arrays already checked, masked and converted
to the compute dtype (float32 or float64) with equal shapes or scalars; it is written in
jnp ops only, so its derivatives differentiate again (Hessians); it propagates NaN; and
it is exact at infinite logits (no ``0 * inf``, no ``inf - inf``). Nothing here checks
arguments: the losses do that before they get here.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def is_zero(t) -> bool:
    """True for a tangent that is known to be zero (None or a symbolic zero)."""
    return t is None or isinstance(t, SymbolicZero)


def add_tangents(terms: Sequence[jax.Array], out: jax.Array) -> jax.Array:
    """The sum of a JVP rule's tangent terms, shaped as ``out`` (zeros if there are none)."""
    if not terms:
        return jnp.zeros_like(out)
    tangent = terms[0]
    for t in terms[1:]:
        tangent = tangent + t
    return jnp.broadcast_to(tangent, out.shape)


@jax.custom_jvp
def neg_abs(z: jax.Array) -> jax.Array:
    """``-|z|`` whose derivative at z = 0 is -1 (the z >= 0 side), not 0.

    On a GPU ``-|z|`` is free (an operand modifier); the rule keeps the derivative of
    the select ``where(z >= 0, -z, z)``, so that second derivatives are right at 0.
    """
    return -jnp.abs(z)


@neg_abs.defjvp
def _neg_abs_jvp(primals, tangents):
    (z,), (dz,) = primals, tangents
    return neg_abs(z), jnp.where(z >= 0, -dz, dz)


@jax.custom_jvp
def neg_abs_bits(z: jax.Array) -> jax.Array:
    """:func:`neg_abs` written as setting the sign bit of ``z``: the same bits for every
    input (signed zeros, infinities and NaN included) and the same derivative.

    For XLA's HLO passes it is another expression than ``-abs(z)``, so CSE does not
    merge an ``exp`` of it with one of :func:`neg_abs` (a shared ``exp`` is a producer
    whose fusion hangs on the GPU cost model). After fusion LLVM folds the bit
    operation back into ``-fabs(z)`` and the two ``exp`` become one instruction of the
    kernel (one ``MUFU.EX2`` per element in the SASS).
    """
    bits = jnp.dtype(f"uint{8 * jnp.dtype(z.dtype).itemsize}")
    sign = jnp.asarray(1, bits) << (8 * bits.itemsize - 1)
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(z, bits) | sign, z.dtype)


@neg_abs_bits.defjvp
def _neg_abs_bits_jvp(primals, tangents):
    (z,), (dz,) = primals, tangents
    return neg_abs_bits(z), jnp.where(z >= 0, -dz, dz)


def log1p_exp_neg_abs(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``e = exp(-|z|)`` and ``log1p(e)``: the part both softplus terms share.

    ``-|z|`` is a select here, with the z >= 0 branch at 0 as in :func:`neg_abs`
    (XLA:CPU fuses the select better than ``abs`` in the sparse loss).
    """
    e = jnp.exp(jnp.where(z >= 0, -z, z))
    return e, jnp.log1p(e)


def sigmoids(z: jax.Array, e: jax.Array, r: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``sigmoid(z)`` and ``sigmoid(-z)`` from ``e = exp(-|z|)`` and ``r = 1 / (1 + e)``.

    ``r = sigmoid(|z|)`` and ``e r = sigmoid(-|z|)``: no cancellation, also where the
    smaller one is tiny.
    """
    er = e * r
    pos = z >= 0
    return jnp.where(pos, r, er), jnp.where(pos, er, r)


def relus(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``max(z, 0)`` and ``max(-z, 0)`` with the z >= 0 branch of :func:`neg_abs`, so

    that derivatives of their sums with ``log1p(exp(-|z|))`` are right at z = 0.
    """
    pos = z >= 0
    zero = jnp.zeros((), z.dtype)
    return jnp.where(pos, z, zero), jnp.where(pos, zero, -z)


def relus_max(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``max(z, 0)`` and ``max(-z, 0)`` as two maxima sharing no comparison: for loss

    values only (a rule gives the derivatives). XLA on a GPU stores the shared ``z >= 0``
    of :func:`relus` as an array of its own when no gradient is asked for.
    """
    zero = jnp.zeros((), z.dtype)
    return jnp.maximum(z, zero), jnp.maximum(-z, zero)


def times(c: jax.Array, x: jax.Array) -> jax.Array:
    """``c * x`` with ``0 * inf = 0``: a hard label's unused term is exactly zero.

    Only the inf is replaced, so the derivative w.r.t. ``c`` stays ``x`` at c = 0.
    """
    return c * jnp.where((c == 0) & jnp.isinf(x), jnp.zeros((), x.dtype), x)


def coefficients(y: jax.Array, pw: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """The weights of ``softplus(z)`` and ``softplus(-z)``: ``1 - y`` and ``pw y``."""
    return 1 - y, (y if pw is None else pw * y)


# q(x) = (log1p(x) - x) / x**2 on [0, 1], degree 7, lowest degree first: the
# coefficients minimise the largest relative error of x + x**2 q(x)
# (experiments/fit_log1p.py fits and measures them).
LOG1P_Q = (
    -0.49999648332595825,
    0.333213210105896,
    -0.24857161939144135,
    0.19153647124767303,
    -0.1375378668308258,
    0.07920434325933456,
    -0.03006567433476448,
    0.005364794749766588,
)


def log1p_unit(x: jax.Array) -> jax.Array:
    r"""``log1p(x)`` for x in [0, 1] (NaN for NaN) in nine multiply-adds, for float32.

    .. math:: \log(1 + x) = x + x^2 q(x)

    with the degree-7 polynomial :data:`LOG1P_Q` in Horner form: about half the
    instructions of XLA's general ``log1p`` on a GPU, less accurate (tests assert the
    bound). For the kernels of 16-bit logits, whose results are rounded to 8 or 11 bits.
    Float64 takes ``jnp.log1p``.
    """
    if x.dtype != jnp.float32:
        return jnp.log1p(x)
    p = jnp.full((), LOG1P_Q[-1], x.dtype)
    for c in LOG1P_Q[-2::-1]:
        p = p * x + c
    # x (x p), not (x x) p: XLA rewrites exp(a) exp(a) as exp(2 a), a second exp.
    return x + x * (x * p)


def recip_unit(u: jax.Array) -> jax.Array:
    """``1 / u`` for u in [1, 2] as ``rsqrt(u)**2``, for the kernels of 16-bit logits.

    On a GPU ``rsqrt`` is one special-function instruction where a division takes about
    seven; the result is a few float32 ulp less accurate (tests assert the bound).
    Float64 divides.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxbce._elementwise import recip_unit
        >>> u = jnp.array([1.0, 1.5, 2.0])
        >>> bool(jnp.allclose(recip_unit(u), 1 / u, rtol=1e-6))
        True
    """
    if u.dtype != jnp.float32:
        return 1 / u
    r = jax.lax.rsqrt(u)
    return r * r
