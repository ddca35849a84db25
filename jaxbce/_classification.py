"""Binary cross-entropy from logits and from probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxbce import _checks, _core, _prepare, _reduce
from jaxbce._compile import compiled


@compiled(scalar_options=("label_smoothing",))
def binary_cross_entropy_with_logits(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    label_smoothing: float | ArrayLike = 0.0,
    where: ArrayLike | None = None,
    ignore_index: Any = None,
    axis: int | Sequence[int] | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Sigmoid binary cross-entropy from logits, exact for every logit including +-inf.

    For a logit :math:`z`, label :math:`y`, weight :math:`w` and positive-class weight
    :math:`w_+`,

    .. math::
        \ell(z, y) = w \left[ w_+ y \operatorname{softplus}(-z)
                      + (1 - y) \operatorname{softplus}(z) \right],

    .. math::
        \frac{\partial \ell}{\partial z}
              = w \left[(1 - y)\,\sigma(z) - w_+ y\,\sigma(-z)\right],

    which is :math:`w(\sigma(z) - y)` for :math:`w_+ = 1`. The loss takes one ``exp``
    and one ``log1p`` per element as a sum of non-negative terms (no cancellation); the
    gradient comes from a ``jax.custom_jvp`` rule sharing that ``exp``, differentiable
    again (Hessians), with derivatives w.r.t. labels and ``pos_weight`` too. Hard labels
    drop their unused term exactly: the loss is 0 at ``(+inf, 1)`` and ``(-inf, 0)``,
    ``+inf`` on the wrong side of an infinite logit and for soft labels there, and the
    gradient stays finite. NaN in gives NaN out, except in entries masked out by
    ``where`` or ``ignore_index``, which contribute nothing.

    Semantics follow PyTorch's ``binary_cross_entropy_with_logits``, plus options it
    lacks. Shapes, dtypes and option values are checked when tracing; array values are
    not (use :func:`check_inputs` under ``checkify``).

    Args:
      logits: float array ``[...]`` (float16, bfloat16, float32 or float64); arithmetic
        runs in at least float32.
      labels: array of exactly the shape of ``logits`` (never broadcast): float in
        [0, 1], bool, or integer (nonzero is the positive class).
      weight: optional per-element weight, broadcastable to ``logits.shape``.
      pos_weight: optional weight of the positive term, broadcastable to
        ``logits.shape`` (``[C]``: one per class of ``[B, C]`` logits).
      label_smoothing: ``eps`` in [0, 1], Keras-style: labels become
        ``y (1 - eps) + eps / 2``.
      where: optional bool mask broadcastable to ``logits.shape``; False entries
        contribute nothing and are not counted by ``"mean"``.
      ignore_index: entries whose label equals this value are masked out as by
        ``where`` (missing labels); NaN matches NaN labels.
      axis: int or tuple of ints to reduce over; None reduces over all axes.
      reduction: ``"mean"`` (default; divides by the number of selected entries, also
        when ``weight`` is given, as PyTorch), ``"sum"``, ``"none"`` or
        ``"weighted_mean"`` (``sum(w * loss) / sum(w)``). An empty mean is 0.

    Returns:
      ``"none"``: the per-element loss, ``logits.shape``, in the logits' dtype.
      Otherwise a scalar (``axis=None``) or ``logits.shape`` without ``axis``, in at
      least float32 (float32 for 16-bit logits, as under PyTorch's autocast).

    Raises:
      TypeError: non-float logits; non-numeric labels; non-bool ``where``.
      ValueError: labels' shape differs from the logits'; ``weight``, ``pos_weight`` or
        ``where`` do not broadcast to it; unknown ``reduction``; ``axis`` out of range;
        ``label_smoothing`` outside [0, 1].

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxbce
      >>> logits = jnp.array([[2.0, -1.0], [0.5, jnp.inf]])
      >>> labels = jnp.array([[1, 0], [0, 1]])
      >>> print(jaxbce.binary_cross_entropy_with_logits(logits, labels, reduction="none"))
      [[0.126928  0.3132617]
       [0.974077  0.       ]]
      >>> print(jaxbce.binary_cross_entropy_with_logits(logits, labels, axis=-1))
      [0.22009484 0.4870385 ]

    References:
      PyTorch ``torch.nn.BCEWithLogitsLoss``; optax ``sigmoid_binary_cross_entropy``;
      Keras ``BinaryCrossentropy(from_logits=True, label_smoothing=...)``.
    """
    p = _prepare.prepare(
        logits, labels, weight, where, ignore_index, axis, reduction, label_smoothing, convert=False
    )
    pos_weight = _checks.check_broadcast(pos_weight, "pos_weight", p.x.shape, p.compute_dtype)
    hard = _prepare.labels_are_hard(labels, label_smoothing)
    kernel = _core.kernel_for(hard, narrow=_prepare.is_narrow(p.dtype))
    return _reduce.finish(kernel(p.x, p.y, pos_weight), p, reduction)


@compiled()
def sigmoid_binary_cross_entropy(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
    r"""Drop-in for ``optax.losses.sigmoid_binary_cross_entropy``: per-element loss.

    .. math:: \ell(z, y) = -y \log \sigma(z) - (1 - y) \log \sigma(-z)

    Same signature and output as optax (per-element loss, the shape and dtype of
    ``logits``), computed by the same core as :func:`binary_cross_entropy_with_logits`:
    exact at infinite logits, accurate gradient, and labels must match the logits' shape
    exactly (optax silently turns ``(B, 1)`` logits and ``(B,)`` labels into ``(B, B)``).

    Args:
      logits: float array ``[...]``.
      labels: array of the same shape: float in [0, 1], bool or integer.

    Returns:
      The per-element loss, shape and dtype of ``logits``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxbce
      >>> print(jaxbce.sigmoid_binary_cross_entropy(jnp.array([0.0, 3.0]), jnp.array([1.0, 0.0])))
      [0.6931472 3.0485873]
    """
    return binary_cross_entropy_with_logits(logits, labels, reduction="none")


@compiled()
def binary_cross_entropy(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: Any = None,
    axis: int | Sequence[int] | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Binary cross-entropy on probabilities, PyTorch ``BCELoss`` semantics.

    .. math::
        \ell(p, y) = -w \left[ y \max(\log p, -100) + (1 - y) \max(\log(1 - p), -100)
                     \right],

    .. math::
        \frac{\partial \ell}{\partial p} = w \frac{p - y}{\max(p (1 - p), 10^{-12})}

    Each log term is clamped at -100 so that ``p = 0`` or ``p = 1`` gives a finite loss,
    and the gradient (a ``custom_jvp`` rule, as PyTorch's backward) is finite there too.

    Prefer :func:`binary_cross_entropy_with_logits` whenever the model can output logits.
    In float32, ``sigmoid(z)`` rounds to exactly 1 once ``z`` exceeds about 17 and to 0
    below about -88, after which this loss saturates at the clamp (100); well before
    that, from ``z < -27.6`` with ``y = 1``, ``p (1 - p)`` falls under the 1e-12 clamp and
    the gradient w.r.t. the logit, ``p (1 - p) dL/dp``, is wrong (-0.094 instead of -1 at
    ``z = -30``). From logits the loss and the ``sigmoid(z) - y`` gradient stay exact for
    every logit. Probabilities outside [0, 1] give NaN where PyTorch raises:
    :func:`check_inputs` (``probs=...``) checks them under ``checkify``.

    Args:
      probs: float array ``[...]`` of probabilities in [0, 1].
      labels: array of exactly the shape of ``probs``: float in [0, 1], bool or integer.
      weight: optional per-element weight, broadcastable to ``probs.shape``.
      where: optional bool mask broadcastable to ``probs.shape``.
      ignore_index: entries whose label equals this value are masked out.
      axis: int or tuple of ints to reduce over; None reduces over all axes.
      reduction: ``"mean"`` (default), ``"sum"``, ``"none"`` or ``"weighted_mean"``.

    Returns:
      The loss, shaped and typed as by :func:`binary_cross_entropy_with_logits`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxbce
      >>> p = jnp.array([0.9, 0.2, 0.0])
      >>> y = jnp.array([1.0, 0.0, 1.0])
      >>> print(jaxbce.binary_cross_entropy(p, y, reduction="none"))
      [  0.10536055   0.22314355 100.        ]

    References:
      PyTorch ``torch.nn.BCELoss``.
    """
    p = _prepare.prepare(probs, labels, weight, where, ignore_index, axis, reduction, name="probs")
    return _reduce.finish(_core.bce_on_probs(p.x, p.y), p, reduction)


@compiled()
def pos_weight_from_labels(
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    ignore_index: Any = None,
    axis: int | Sequence[int] = 0,
    max_weight: float | None = None,
) -> jax.Array:
    r"""Per-class ``pos_weight = n_negative / n_positive``, for imbalanced data.

    Counts positives and negatives over ``axis`` (the batch axis by default): a bool or
    integer label counts as one positive when nonzero, as in the losses; float labels
    count their mass ``sum(y)``. A class with no positives gets weight 1 (no
    reweighting) instead of inf; ``max_weight`` optionally caps the result.

    Args:
      labels: ``[N, C]`` (or any shape) labels: float in [0, 1], bool or integer.
      where: optional bool mask of the same broadcastable shape; False entries are not
        counted (missing labels).
      ignore_index: label value of missing entries, not counted.
      axis: axes to count over (default 0).
      max_weight: optional upper bound on the returned weights.

    Returns:
      float32 array of the shape of ``labels`` without ``axis``, e.g. ``[C]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxbce
      >>> y = jnp.array([[1, 0], [0, 0], [0, 0], [0, 0]])
      >>> print(jaxbce.pos_weight_from_labels(y))
      [3. 1.]
    """
    labels = _checks.check_labels(labels, jnp.shape(labels))
    shape = labels.shape
    axis = _checks.normalize_axis(axis, labels.ndim)
    mask = _prepare.make_mask(where, labels, ignore_index, shape, target="labels")
    y = _prepare.label_values(labels).astype(jnp.float32)
    sel = jnp.ones(shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    (y,) = _prepare.apply_mask(mask, y)
    n_pos = jnp.sum(y, axis=axis)
    n_neg = jnp.sum(sel, axis=axis) - n_pos
    w = jnp.where(n_pos > 0, n_neg / jnp.where(n_pos > 0, n_pos, 1.0), 1.0)
    if max_weight is not None:
        w = jnp.minimum(w, max_weight)
    return w
