"""Binary cross-entropy with sparse positive-index targets, for extreme multi-label.

With 10^4 to 10^6 labels per sample, a dense 0/1 label array costs as much memory
traffic as the logits. Here the positives come as a padded ``[B, K]`` index array and
the dense labels are never formed: the loss is the BCE of every class as a negative
plus a correction gathered at the (deduplicated) positives, and the gradient is the
negatives' gradient with the positives' entries overwritten by one scatter.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.typing import ArrayLike

from jaxbce import _common, _core

_INT32_MAX = int(np.iinfo(np.int32).max)


def _check_indices(indices: Any, batch: int, num_classes: int, pad: Any) -> jax.Array:
    """Trace-time checks of ``positive_indices``: dtype, rank, batch size and ``pad``.

    When ``indices`` is a NumPy array or a list (values known without a device round
    trip), its values are checked too; otherwise use :func:`check_positive_indices`.
    """
    dt = getattr(indices, "dtype", None)
    dt = np.asarray(indices).dtype if dt is None else np.dtype(dt)
    if not jnp.issubdtype(dt, jnp.integer):
        raise TypeError(
            f"positive_indices must be an integer array of class indices; got dtype {dt}."
        )
    shape = np.shape(indices)
    if len(shape) != 2 or shape[0] != batch:
        raise ValueError(
            f"positive_indices must have shape (B, K) = ({batch}, K) for logits of shape "
            f"({batch}, {num_classes}); got shape {shape}."
        )
    if not isinstance(pad, (int, np.integer)) or isinstance(pad, bool):
        raise TypeError(f"pad must be a Python int; got {pad!r}.")
    if 0 <= pad < num_classes:
        raise ValueError(
            f"pad={pad} is a valid class index for {num_classes} classes; pad must lie "
            f"outside [0, {num_classes}) (e.g. -1 or {num_classes})."
        )
    if num_classes + shape[1] > _INT32_MAX:
        raise ValueError(f"num_classes + K must be below 2**31; got {num_classes} + {shape[1]}.")
    if isinstance(indices, (np.ndarray, list, tuple)):
        values = np.asarray(indices)
        bad = (values != pad) & ((values < 0) | (values >= num_classes))
        if bad.any():
            raise ValueError(
                f"positive_indices has {int(bad.sum())} entries that are neither pad "
                f"({pad}) nor a class index in [0, {num_classes}) (first: "
                f"{values[bad].flat[0]} at {tuple(int(i) for i in np.argwhere(bad)[0])})."
            )
    return jnp.asarray(indices)


def check_positive_indices(indices: ArrayLike, num_classes: int, *, pad: int = -1) -> None:
    """Checks index values with ``checkify.check``: every entry is ``pad`` or in range.

    :func:`sparse_binary_cross_entropy_with_logits` checks dtype, rank and shape at trace
    time, but values only when they are a NumPy array: traced indices outside
    ``[0, num_classes)`` are silently ignored like ``pad``. Call this inside the function
    you wrap with ``jax.experimental.checkify.checkify`` to get an error instead.

    Args:
      indices: ``[B, K]`` integer array of positive class indices, padded with ``pad``.
      num_classes: ``C``, the number of classes (``logits.shape[-1]``).
      pad: the padding value, not a class index.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax.experimental import checkify
      >>> import jaxbce
      >>> def loss_fn(z, idx):
      ...     jaxbce.check_positive_indices(idx, z.shape[-1])
      ...     return jaxbce.sparse_binary_cross_entropy_with_logits(z, idx)
      >>> checked = jax.jit(checkify.checkify(loss_fn))
      >>> err, loss = checked(jnp.zeros((2, 4)), jnp.array([[0, 7], [2, -1]]))
      >>> print(err.get())  # doctest: +ELLIPSIS
      jaxbce: positive_indices has 1 entries neither pad (-1) nor in [0, 4) (first 7, row 0)...
    """
    idx = jnp.asarray(indices)
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"positive_indices must be an integer array; got dtype {idx.dtype}.")
    ok = (idx == pad) | _in_range(idx, num_classes)
    flat = jnp.ravel(ok)
    first = jnp.argmin(flat)
    checkify.check(
        jnp.all(ok),
        f"jaxbce: positive_indices has {{bad}} entries neither pad ({pad}) nor in "
        f"[0, {num_classes}) (first {{val}}, row {{row}}).",
        bad=jnp.sum(~ok),
        val=jnp.ravel(idx)[first],
        row=first // max(idx.shape[-1], 1) if idx.ndim > 1 else jnp.zeros((), jnp.int32),
    )


def _in_range(idx: jax.Array, num_classes: int) -> jax.Array:
    """``0 <= idx < num_classes`` without overflowing narrow or unsigned dtypes."""
    info = jnp.iinfo(idx.dtype)
    ok = jnp.ones(idx.shape, jnp.bool_)
    if info.min < 0:
        ok = ok & (idx >= 0)
    if num_classes <= info.max:
        ok = ok & (idx < num_classes)
    return ok


def _unique_positives(idx: jax.Array, num_classes: int):
    """Sorted, deduplicated positive columns of each row.

    Returns ``cols`` (each row's distinct valid indices in ascending order, every other
    slot replaced by a distinct out-of-range column ``num_classes + k``, so a scatter with
    ``mode="drop"`` skips it and all indices are unique), ``safe`` (the same with those
    slots at 0, for gathers) and ``keep`` (the bool mask of the real positives).
    """
    batch, k = idx.shape
    valid = _in_range(idx, num_classes)
    s = jnp.sort(jnp.where(valid, idx, num_classes).astype(jnp.int32), axis=1)
    prev = jnp.pad(s, ((0, 0), (1, 0)), constant_values=-1)[:, :k]
    keep = (s != prev) & (s < num_classes)
    slot = num_classes + jnp.arange(k, dtype=jnp.int32)[None, :]
    cols = jnp.where(keep, s, slot)
    safe = jnp.where(keep, s, 0)
    return cols, safe, keep


def _view2d(x: ArrayLike | None, dtype: Any) -> jax.Array | None:
    """An operand broadcastable to ``(B, C)`` as a rank-2 array of shape ``(1|B, 1|C)``."""
    if x is None:
        return None
    x = jnp.asarray(x).astype(dtype)
    return x.reshape((1,) * (2 - x.ndim) + x.shape)


def _full(x2: jax.Array | None, shape: tuple[int, int]) -> jax.Array | None:
    return None if x2 is None else jnp.broadcast_to(x2, shape)


def _at(x2: jax.Array | None, safe: jax.Array) -> jax.Array | None:
    """``x2`` broadcast to ``(B, C)`` and read at ``(row, safe[row, k])``: shape ``(B, K)``."""
    if x2 is None:
        return None
    batch, k = safe.shape
    rows = jnp.arange(batch)[:, None] if x2.shape[0] > 1 else jnp.zeros((batch, 1), jnp.int32)
    cols = safe if x2.shape[1] > 1 else jnp.zeros_like(safe)
    return x2.at[rows, cols].get(mode="promise_in_bounds")


def _scatter(x: jax.Array, cols: jax.Array, values: jax.Array) -> jax.Array:
    """``x`` with ``x[row, cols[row, k]] = values[row, k]``; out-of-range columns dropped."""
    rows = jnp.arange(x.shape[0])[:, None]
    return x.at[rows, cols].set(values, mode="drop", unique_indices=True, indices_are_sorted=True)


def _label(y: jax.Array | None, default: float, shape, dtype) -> jax.Array:
    return jnp.full(shape, default, dtype) if y is None else jnp.broadcast_to(y, shape)


def _bce(z: jax.Array, y: jax.Array | None, pw: jax.Array | None) -> jax.Array:
    """The core BCE at a scalar label ``y``; None stands for 0 (no label smoothing).

    For y = 0 the core's value is ``softplus(z) = max(z, 0) + log1p(exp(-|z|))`` whatever
    ``pw``. Only the value is taken from here (its derivative is :func:`_d_bce`), so it is
    written without a label operand or a select, and with the constant -0.0, which no
    other fusion shares: XLA:CPU's reduction fusion (YNNPACK) then reads the logits
    alone, where a constant label, a select or a shared broadcast constant would be
    materialised as a ``[B, C]`` array first.
    """
    if y is None:
        return jnp.maximum(z, -0.0) + jnp.log1p(jnp.exp(-jnp.abs(z)))
    return _core.bce_with_logits(z, jnp.broadcast_to(y, z.shape), pw)


def _d_bce(z: jax.Array, y: jax.Array | None, pw: jax.Array | None) -> jax.Array:
    """d/dz of :func:`_bce`, element-wise: ``sigmoid(z)`` for y = 0, else the core's rule."""
    if y is None:
        return _core._sigmoids(z, _core._log1p_exp_neg_abs(z)[0])[0]
    y = jnp.broadcast_to(y, z.shape)
    return jax.jvp(lambda z: _core.bce_with_logits(z, y, pw), (z,), (jnp.ones_like(z),))[1]


def _parts(z, safe, m2, pw2):
    """Masked logits and the element-wise pieces shared by loss and gradient."""
    shape = z.shape
    mask = None if m2 is None else jnp.broadcast_to(m2, shape)
    (zm,) = _common.apply_mask(mask, z)
    pw = _full(pw2, shape)
    z_k = jnp.take_along_axis(zm, safe, axis=1, mode="promise_in_bounds")
    return zm, pw, z_k, _at(pw2, safe)


def _dense_loss(z, cols, safe, y0, y1, m2, pw2) -> jax.Array:
    """The per-element ``[B, C]`` loss (negatives' BCE, positives' BCE scattered in)."""
    zm, pw, z_k, pw_k = _parts(z, safe, m2, pw2)
    base = _core.bce_with_logits(zm, _label(y0, 0.0, z.shape, z.dtype), pw)
    pos = _core.bce_with_logits(z_k, _label(y1, 1.0, z_k.shape, z.dtype), pw_k)
    return _scatter(base, cols, pos)


def _mask_weight(shape, w2, m2):
    w = _full(w2, shape)
    m = None if m2 is None else jnp.broadcast_to(m2 != 0, shape)
    return w, m


def _dense_total(axis, z, cols, safe, keep, y0, y1, w2, m2, pw2, scale) -> jax.Array:
    """Reference formulation of :func:`_sparse_total` through the dense per-element loss.

    Used for ``reduction="none"`` and for the derivatives with respect to everything but
    the logits (weights, pos_weight, label smoothing, the mean's normalisation).
    """
    loss = _dense_loss(z, cols, safe, y0, y1, m2, pw2)
    w, m = _mask_weight(z.shape, w2, m2)
    total = _common.reduce_loss(
        loss, weight=w, mask=m, axis=axis, reduction="sum", dtype=loss.dtype
    )
    return total * scale


def _reduce_positives(corr: jax.Array, cols: jax.Array, axis, num_classes: int) -> jax.Array:
    """Sums ``[B, K]`` per-positive terms over ``axis`` of the ``[B, C]`` loss."""
    if axis is None or axis == (0, 1):
        return jnp.sum(corr)
    if axis == (1,):
        return jnp.sum(corr, axis=1)
    # axis == (0,): a per-class sum, one small scatter-add into C entries
    return jnp.zeros(num_classes, corr.dtype).at[cols].add(corr, mode="drop")


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _sparse_total(axis, z, cols, safe, keep, y0, y1, w2, m2, pw2, scale) -> jax.Array:
    """``scale * sum_axis(w * mask * loss)`` without forming dense labels or a dense loss.

    Every class is first taken as a negative (label ``y0``): that sum fuses with the read
    of the logits. Each distinct positive then adds ``bce(z, y1) - bce(z, y0)``, gathered
    at ``K`` entries per row.
    """
    zm, pw, z_k, pw_k = _parts(z, safe, m2, pw2)
    w, m = _mask_weight(z.shape, w2, m2)
    base = _bce(zm, y0, pw)
    total = _common.reduce_loss(
        base, weight=w, mask=m, axis=axis, reduction="sum", dtype=base.dtype
    )
    pos = _core.bce_with_logits(z_k, _label(y1, 1.0, z_k.shape, z.dtype), pw_k)
    neg = _core.bce_with_logits(z_k, _label(y0, 0.0, z_k.shape, z.dtype), pw_k)
    sel = keep if m2 is None else keep & (_at(m2, safe) != 0)
    corr = pos - neg
    if w2 is not None:
        corr = corr * _at(w2, safe)
    # mask last, so that an inf or NaN weight at a masked-out positive stays out
    corr = jnp.where(sel, corr, jnp.zeros((), corr.dtype))
    return (total + _reduce_positives(corr, cols, axis, z.shape[1])) * scale


# The gradient w.r.t. the logits is the negatives' gradient with the positives' entries
# overwritten (not corrected by an add, which would cancel: sigmoid(z) - 1 rounds to 0 for
# z > 17 where the dense function returns -sigmoid(-z)), with weight, mask and scale
# folded in before the scatter, so that under value_and_grad XLA writes the gradient once
# and patches K entries per row in place. Derivatives w.r.t. the other float inputs go
# through the dense formulation, which costs nothing unless they are differentiated.
@functools.partial(_sparse_total.defjvp, symbolic_zeros=True)
def _sparse_total_jvp(axis, primals, tangents):
    z, cols, safe, keep, y0, y1, w2, m2, pw2, scale = primals
    dz, _, _, _, dy0, dy1, dw2, _, dpw2, dscale = tangents
    out = _sparse_total(axis, *primals)
    tangent = jnp.zeros_like(out)
    if not _core._is_zero(dz):
        zm, pw, z_k, pw_k = _parts(z, safe, m2, pw2)
        w, m = _mask_weight(z.shape, w2, m2)
        s = scale if axis is None or scale.ndim == 0 else jnp.expand_dims(scale, axis)
        g = _d_bce(zm, y0, pw) * s
        g_k = _d_bce(z_k, _label(y1, 1.0, z_k.shape, z.dtype), pw_k)
        g_k = g_k * (s if s.ndim == 0 else _at(s, safe))
        if w is not None:
            g, g_k = g * w, g_k * _at(w2, safe)
        if m is not None:
            zero = jnp.zeros((), g.dtype)
            g, g_k = jnp.where(m, g, zero), jnp.where(_at(m2, safe) != 0, g_k, zero)
        grad = _scatter(g, cols, g_k)
        tangent = tangent + jnp.sum(grad * dz, axis=axis)
    rest = (y0, y1, w2, pw2, scale)
    d_rest = (dy0, dy1, dw2, dpw2, dscale)
    if not all(_core._is_zero(t) for t in d_rest):
        d_rest = tuple(
            None if p is None else (jnp.zeros_like(p) if _core._is_zero(t) else t)
            for p, t in zip(rest, d_rest, strict=True)
        )

        def dense(y0, y1, w2, pw2, scale):
            return _dense_total(axis, z, cols, safe, keep, y0, y1, w2, m2, pw2, scale)

        tangent = tangent + jax.jvp(dense, rest, d_rest)[1]
    return out, tangent


def sparse_binary_cross_entropy_with_logits(
    logits: ArrayLike,
    positive_indices: ArrayLike,
    *,
    pad: int = -1,
    weight: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    label_smoothing: float | ArrayLike = 0.0,
    where: ArrayLike | None = None,
    axis: int | Sequence[int] | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Multi-label sigmoid BCE from logits and the indices of the positive classes.

    Equals :func:`binary_cross_entropy_with_logits` on the dense labels
    ``y[b, c] = 1 if c in positive_indices[b] else 0``, without forming them. With
    :math:`y_0 = \varepsilon / 2` and :math:`y_1 = 1 - \varepsilon / 2` the smoothed
    negative and positive labels, :math:`P_b` the distinct positives of row :math:`b`
    and :math:`\ell(z, y) = (1 - y)\operatorname{softplus}(z) + w_+ y
    \operatorname{softplus}(-z)` the core element-wise loss,

    .. math::
        \sum_{b, c} w_{bc}\, \ell(z_{bc}, y_{bc})
        = \sum_{b, c} w_{bc}\, \ell(z_{bc}, y_0)
        + \sum_b \sum_{c \in P_b} w_{bc} (1 - \varepsilon)
          \left[w_{+,bc} \operatorname{softplus}(-z_{bc})
                - \operatorname{softplus}(z_{bc})\right].

    The first sum fuses with the one read of the logits; the second reads ``K`` entries
    per row. The gradient w.r.t. the logits (a ``jax.custom_jvp`` rule) is
    :math:`w\,[(1 - y_0)\sigma(z) - w_+ y_0 \sigma(-z)]` written once, with the positives'
    entries then overwritten in place by :math:`w\,[(1 - y_1)\sigma(z) - w_+ y_1
    \sigma(-z)]` (a scatter, not an add, so it is as accurate as the dense gradient).
    Under ``value_and_grad`` of the mean, the memory traffic is the logits read once and
    the gradient written once, against logits + labels + gradient for dense labels.

    Accuracy: the gradient and ``reduction="none"`` are as accurate as the dense function.
    A reduced loss adds each positive's ``softplus(z)`` in the first sum and takes it out
    again in the second, so it carries an absolute error of about float32 eps times
    :math:`\sum_{c \in P_b} \operatorname{softplus}(z_{bc})` per row: negligible for
    training, but a well-fitted row whose true loss is below that reads as a tiny (even
    slightly negative) number. For the same reason a positive whose logit is ``+inf``
    makes the reduced loss NaN (the dense function gives the exact 0 there).

    ``positive_indices[b]`` lists row ``b``'s positive classes in any order, padded with
    ``pad``; repeated indices count once. Indices outside ``[0, C)`` are ignored like
    ``pad`` (they are rejected at trace time when given as a NumPy array; use
    :func:`check_positive_indices` under ``checkify`` for traced ones).

    Args:
      logits: float array ``[B, C]`` (float16, bfloat16, float32, float64); arithmetic
        runs in at least float32.
      positive_indices: integer array ``[B, K]`` of class indices in ``[0, C)``, padded
        with ``pad``.
      pad: the padding value, outside ``[0, C)`` (default -1).
      weight: optional per-element weight, broadcastable to ``[B, C]``.
      pos_weight: optional weight of the positive term, broadcastable to ``[B, C]``
        (shape ``[C]``: one per class).
      label_smoothing: ``eps`` in [0, 1]; labels become ``y * (1 - eps) + eps / 2``.
      where: optional bool mask broadcastable to ``[B, C]``; False entries contribute
        nothing and are not counted by ``"mean"``.
      axis: int or tuple of ints of ``[B, C]`` to reduce over; None (default): all.
      reduction: ``"mean"`` (default; divides by the number of selected entries,
        ``B * C`` without a mask), ``"sum"``, ``"none"`` (returns the dense ``[B, C]``
        loss) or ``"weighted_mean"`` (``sum(weight * loss) / sum(weight)``).

    Returns:
      The loss in the dtype of ``logits``: ``[B, C]`` for ``"none"``, a scalar when
      ``axis`` is None, else ``[B, C]`` without the reduced axes.

    Raises:
      TypeError: non-float logits; non-integer ``positive_indices``; non-int ``pad``;
        non-bool ``where``.
      ValueError: logits not of rank 2; ``positive_indices`` not ``[B, K]``; ``pad`` a
        valid class index; out-of-range values in NumPy ``positive_indices``; ``weight``,
        ``pos_weight`` or ``where`` that do not broadcast to ``[B, C]``; unknown
        ``reduction``; ``axis`` out of range; ``label_smoothing`` outside [0, 1].

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jaxbce
      >>> logits = jnp.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
      >>> positives = jnp.array([[0, -1], [2, 1]])  # row 0: class 0; row 1: classes 1, 2
      >>> print(jaxbce.sparse_binary_cross_entropy_with_logits(logits, positives, axis=1))
      [0.47142228 0.95622087]
      >>> print(jax.grad(jaxbce.sparse_binary_cross_entropy_with_logits)(logits, positives))
      [[-0.01986715  0.04482357  0.10374323]
       [ 0.08333334 -0.00790431 -0.1467995 ]]

      The same as :func:`binary_cross_entropy_with_logits` on the dense labels:

      >>> dense = jnp.array([[1, 0, 0], [0, 1, 1]])
      >>> print(jax.grad(jaxbce.binary_cross_entropy_with_logits)(logits, dense))
      [[-0.01986715  0.04482357  0.10374323]
       [ 0.08333334 -0.00790431 -0.1467995 ]]

    References:
      Multi-label classification with many labels (e.g. the Extreme Classification
      Repository, http://manikvarma.org/downloads/XC/XMLRepository.html); PyTorch
      ``BCEWithLogitsLoss`` semantics for every option.
    """
    logits = _common.check_float_array(logits, "logits")
    if logits.ndim != 2:
        raise ValueError(
            f"logits must have shape (B, C) (rank 2); got shape {logits.shape}. Reshape "
            "leading axes into B."
        )
    shape, dtype = logits.shape, logits.dtype
    batch, num_classes = shape
    cdt = _common.compute_dtype(dtype)
    idx = _check_indices(positive_indices, batch, num_classes, pad)
    axis = _common.normalize_axis(axis, 2)
    _common.check_reduction(reduction)
    w_full = _common.check_broadcast(weight, "weight", shape, cdt)
    _common.check_broadcast(pos_weight, "pos_weight", shape, cdt)
    mask = _common.make_mask(where, None, None, shape)
    if isinstance(label_smoothing, (int, float)) and label_smoothing == 0:
        _common.check_scalar_option(label_smoothing, "label_smoothing")
        y0 = y1 = None  # labels 0 and 1: no label operand at all
    else:
        y0, y1 = (_common.smooth_labels(jnp.asarray(v, cdt), label_smoothing) for v in (0.0, 1.0))

    z = logits.astype(cdt)
    cols, safe, keep = _unique_positives(idx, num_classes)
    w2, pw2 = _view2d(weight, cdt), _view2d(pos_weight, cdt)
    m2 = None if where is None else _view2d(where, jnp.bool_)

    if reduction == "none" or axis == ():
        loss = _dense_loss(z, cols, safe, y0, y1, m2, pw2)
        return _common.reduce_loss(
            loss, weight=w_full, mask=mask, axis=axis, reduction=reduction, dtype=dtype
        )
    if reduction == "sum":
        scale = jnp.ones((), cdt)
    else:
        weighted = reduction == "weighted_mean" and weight is not None
        count = _common.reduce_loss(
            jnp.ones(shape, cdt),
            weight=w_full if weighted else None,
            mask=mask,
            axis=axis,
            reduction="sum",
            dtype=cdt,
        )
        scale = 1 / jnp.where(count == 0, jnp.ones((), cdt), count)
    total = _sparse_total(axis, z, cols, safe, keep, y0, y1, w2, m2, pw2, scale)
    return total.astype(dtype)
