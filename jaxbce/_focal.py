"""Sigmoid focal loss from logits, in log space, under ``jax.custom_jvp``."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxbce import _checks, _core, _prepare, _reduce
from jaxbce import _elementwise as ew
from jaxbce._compile import compiled


def _log_modulus(hard: bool, z: jax.Array, y: jax.Array):
    """``log m`` with ``m = 1 - p_t = y sigmoid(-z) + (1 - y) sigmoid(z)``, and its parts.

    Hard labels take ``log m = -softplus(+-z)`` (exact for every logit, also where ``m``
    underflows); soft labels take ``log(m)`` directly: ``m`` is a convex combination of
    ``y`` and ``1 - y`` there, so ``m >= min(y, 1 - y) > 0``. Unselected branches run on
    safe stand-in values, so that no inf or NaN reaches a derivative (Hessians).

    Returns ``(log_m, dlogm_dz, bce_dlogm_dy)``: ``d log m / dz`` and
    ``bce * d log m / dy`` (the latter finite for hard labels although ``d log m / dy``
    alone is not: it is ``(sigmoid(-z) - sigmoid(z)) * bce / m`` with ``bce / m`` bounded
    by ``1 + |z|``).
    """
    e, lg = ew.log1p_exp_neg_abs(z)
    s_pos, s_neg = ew.sigmoids(z, e, 1 / (1 + e))
    relu_z, relu_neg_z = ew.relus(z)
    sp_pos = relu_z + lg  # softplus(z)
    sp_neg = relu_neg_z + lg  # softplus(-z)
    one = y == 1
    # bce / m for a hard label: softplus(t) / sigmoid(t) with t = -z (y = 1), z (y = 0),
    # from the shared e = exp(-|z|): (t + log1p(e)) (1 + e) for t >= 0 and
    # log1p(e) / e * (1 + e) for t < 0 (-> 1 + e as e -> 0).
    t = jnp.where(one, -z, z)
    e_safe = jnp.where(e == 0, jnp.ones((), e.dtype), e)
    h = jnp.where(e == 0, jnp.ones((), e.dtype), lg / e_safe)
    q_hard = (1 + e) * jnp.where(t >= 0, t + lg, h)
    d_sig = s_neg - s_pos
    log_m = -jnp.where(one, sp_pos, sp_neg)
    dlogm_dz = jnp.where(one, -s_pos, s_neg)
    bce_dlogm_dy = d_sig * q_hard
    if hard:
        return log_m, dlogm_dz, bce_dlogm_dy
    soft = (y != 1) & (y != 0)
    ys = jnp.where(soft, y, jnp.full((), 0.5, y.dtype))
    m = ys * s_neg + (1 - ys) * s_pos
    bce = _core.bce_with_logits(z, ys, None)
    log_m = jnp.where(soft, jnp.log(m), log_m)
    dlogm_dz = jnp.where(soft, (1 - 2 * ys) * (s_pos * s_neg / m), dlogm_dz)
    bce_dlogm_dy = jnp.where(soft, d_sig * (bce / m), bce_dlogm_dy)
    return log_m, dlogm_dz, bce_dlogm_dy


def _modulating_factor(log_m: jax.Array, gamma: jax.Array) -> jax.Array:
    """``m ** gamma = exp(gamma log m)``, with ``0 ** 0 = 1`` (gamma = 0 gives exactly 1)."""
    zero = jnp.zeros((), log_m.dtype)
    return jnp.exp(jnp.where(gamma == 0, zero, gamma * log_m))


def _alpha_t(y: jax.Array, alpha: jax.Array | None) -> jax.Array | None:
    return None if alpha is None else alpha * y + (1 - alpha) * (1 - y)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def focal_with_logits(
    hard: bool, z: jax.Array, y: jax.Array, alpha: jax.Array | None, gamma: jax.Array
) -> jax.Array:
    r"""Element-wise ``alpha_t * m ** gamma * bce(z, y)``, ``m = 1 - p_t``, in log space.

    ``hard`` (static) says the labels are known to be 0 or 1 (bool or integer dtype),
    which skips the soft-label branch. ``alpha`` is None (no class balancing) or an
    array broadcast against ``z``; ``gamma`` a scalar.

    Derivatives (the rule below), with ``a = sigmoid(z)``, ``b = sigmoid(-z)``:
    d/dz = alpha_t m^gamma (gamma bce dlog m/dz + (1 - y) a - y b), where dlog m/dz is
    -a for y = 1, b for y = 0 and (1 - 2y) a b / m for soft labels, so that no power of
    ``m`` below ``gamma`` appears and the gradient is finite for every gamma >= 0;
    d/dy = (2 alpha - 1) m^gamma bce + alpha_t m^gamma (gamma bce dlog m/dy - z);
    d/dalpha = (2y - 1) m^gamma bce; d/dgamma = alpha_t m^gamma log(m) bce.
    """
    bce = _core.bce_with_logits(z, y, None)
    log_m, _, _ = _log_modulus(hard, z, y)
    loss = _modulating_factor(log_m, gamma) * bce
    a_t = _alpha_t(y, alpha)
    return loss if a_t is None else a_t * loss


# The rule gives the analytic derivative (never the m ** (gamma - 1) of autodiff through
# pow, which is inf * 0 = NaN for gamma < 1 where m underflows), shares exp(-|z|) with
# the loss, is written in jnp ops so that it differentiates again, and skips the work
# for arguments that are not differentiated (symbolic zeros).
@functools.partial(focal_with_logits.defjvp, symbolic_zeros=True)
def _focal_with_logits_jvp(hard, primals, tangents):
    z, y, alpha, gamma = primals
    dz, dy, dalpha, dgamma = tangents
    out = focal_with_logits(hard, z, y, alpha, gamma)
    bce, dbce_dz = _core.value_and_dz(_core.bce_with_logits, z, y, None)
    log_m, dlogm_dz, bce_dlogm_dy = _log_modulus(hard, z, y)
    mod = _modulating_factor(log_m, gamma)
    a_t = _alpha_t(y, alpha)

    def scaled(x):
        return x if a_t is None else a_t * x

    terms = []
    if not ew.is_zero(dz):
        d_z = mod * (ew.times(gamma * dlogm_dz, bce) + dbce_dz)
        terms.append(scaled(d_z) * dz)
    if not ew.is_zero(dy):
        d_y = mod * (gamma * bce_dlogm_dy - z)
        d_y = scaled(d_y)
        if alpha is not None:
            d_y = d_y + (2 * alpha - 1) * mod * bce
        terms.append(d_y * dy)
    if alpha is not None and not ew.is_zero(dalpha):
        terms.append((2 * y - 1) * mod * bce * dalpha)
    if not ew.is_zero(dgamma):
        terms.append(scaled(ew.times(ew.times(mod, log_m), bce)) * dgamma)
    return out, ew.add_tangents(terms, out)


@compiled(scalar_options=("alpha", "gamma"))
def sigmoid_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: float | ArrayLike | None = 0.25,
    gamma: float | ArrayLike = 2.0,
    weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: Any = None,
    axis: int | Sequence[int] | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Sigmoid focal loss from logits, finite with a finite gradient for every gamma >= 0.

    With :math:`p = \sigma(z)`, :math:`p_t = y p + (1 - y)(1 - p)` and
    :math:`\alpha_t = \alpha y + (1 - \alpha)(1 - y)` (Lin et al. 2017, as torchvision),

    .. math::
        \ell(z, y) = w\, \alpha_t\, (1 - p_t)^\gamma\,
                     \mathrm{BCE}(z, y),
        \qquad 1 - p_t = y\,\sigma(-z) + (1 - y)\,\sigma(z),

    where :math:`\mathrm{BCE}` is :func:`binary_cross_entropy_with_logits`. The
    modulating factor is evaluated as :math:`\exp(\gamma \log(1 - p_t))` with
    :math:`\log(1 - p_t) = -\operatorname{softplus}(\pm z)` for hard labels, so it never
    rounds to :math:`0^\gamma` where :math:`p` rounds to 1, and :math:`0^0 = 1`. The
    gradient comes from a ``jax.custom_jvp`` rule,

    .. math::
        \frac{\partial \ell}{\partial z} = w\,\alpha_t (1 - p_t)^\gamma
        \left[\gamma\,\mathrm{BCE}\,\frac{\partial \log(1 - p_t)}{\partial z}
              + (1 - y)\,\sigma(z) - y\,\sigma(-z)\right],

    with :math:`\partial \log(1 - p_t) / \partial z = -\sigma(z)` for :math:`y = 1` and
    :math:`\sigma(-z)` for :math:`y = 0`: no power of :math:`1 - p_t` below
    :math:`\gamma` appears, so loss and gradient are finite for every finite logit and
    every :math:`\gamma \ge 0` (torchvision's gradient is NaN for :math:`\gamma < 1`
    at large :math:`|z|`; Keras clips :math:`p`). Infinite logits give 0 on the right
    side and ``+inf`` on the wrong side. With ``gamma=0`` and ``alpha=None`` the result
    equals :func:`binary_cross_entropy_with_logits` exactly. Soft labels use
    torchvision's formula, where :math:`1 - p_t \ge \min(y, 1 - y) > 0`.

    Args:
      logits: float array of any shape ``[...]`` (float16, bfloat16, float32, float64).
        Arithmetic runs in at least float32.
      labels: array of exactly the shape of ``logits`` (never broadcast): float in
        [0, 1], bool or integer. Bool and integer labels skip the soft-label branch.
      alpha: weight of the positive class in [0, 1] (negatives get ``1 - alpha``), a
        scalar or an array broadcastable to ``logits.shape`` along trailing axes (one
        per class); None disables class balancing (torchvision's ``alpha=-1``, optax's
        None). Default 0.25, as torchvision.
      gamma: focusing parameter, a scalar >= 0 (default 2). ``gamma=0`` is BCE.
      weight: optional per-element weight, broadcastable to ``logits.shape``.
      where: optional bool mask broadcastable to ``logits.shape``; False entries
        contribute nothing and are not counted by ``"mean"``.
      ignore_index: entries whose label equals this value are masked out as by ``where``.
      axis: int or tuple of ints to reduce over; None (default) reduces over all axes.
      reduction: ``"mean"`` (default; torchvision's default is ``"none"``), ``"sum"``,
        ``"none"`` or ``"weighted_mean"`` (``sum(weight * loss) / sum(weight)``).

    Returns:
      The loss, shaped and typed as by :func:`binary_cross_entropy_with_logits`.

    Raises:
      TypeError: non-float logits; complex or non-numeric labels; non-bool ``where``.
      ValueError: labels' shape differs from logits'; ``weight``, ``alpha`` or ``where``
        do not broadcast to the logits' shape; ``alpha`` outside [0, 1]; ``gamma`` not a
        scalar or negative; unknown ``reduction``; ``axis`` out of range.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jaxbce
      >>> logits = jnp.array([3.0, -2.0, 30.0, -30.0])
      >>> labels = jnp.array([1, 1, 0, 0])
      >>> print(jaxbce.sigmoid_focal_loss(logits, labels, reduction="none"))
      [2.7320833e-05 4.1251957e-01 2.2500000e+01 0.0000000e+00]

      With gamma < 1 far from the decision boundary the gradient stays finite (and
      accurate) where torchvision's is NaN:

      >>> z, y = jnp.array([25.0, -40.0]), jnp.array([1, 0])
      >>> print(jax.grad(jaxbce.sigmoid_focal_loss)(z, y, alpha=None, gamma=0.5))
      [-3.8816665e-17  6.5673834e-27]

    References:
      T.-Y. Lin, P. Goyal, R. Girshick, K. He, P. Dollar, `Focal Loss for Dense Object
      Detection <https://arxiv.org/abs/1708.02002>`_, ICCV 2017;
      ``torchvision.ops.sigmoid_focal_loss``; ``optax.losses.sigmoid_focal_loss``.
    """
    hard = _checks.is_hard_dtype(_checks.dtype_of(labels))
    p = _prepare.prepare(logits, labels, weight, where, ignore_index, axis, reduction)
    _checks.check_scalar_option(gamma, "gamma", hi=None)
    if alpha is not None:
        if np.ndim(alpha) == 0:
            _checks.check_scalar_option(alpha, "alpha")
            alpha = jnp.asarray(alpha, p.compute_dtype)
        else:
            alpha = _checks.check_broadcast(alpha, "alpha", p.x.shape, p.compute_dtype)
    gamma = jnp.asarray(gamma, p.compute_dtype)
    return _reduce.finish(focal_with_logits(hard, p.x, p.y, alpha, gamma), p, reduction)
