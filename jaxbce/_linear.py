"""Sigmoid BCE of a linear layer's output whose logits never exist: the fused linear loss.

For ``C`` = 10^5 to 10^6 labels the ``[B, C]`` logits, their gradient and the labels
dominate a training step. Here the classes are scanned in blocks (``_chunked.py``): each
block's logits ``x @ w_blk + bias_blk`` are formed, turned into the loss and ``p - y`` by
the core's kernels, and consumed at once by the two gradient matmuls. A scalar loss
makes its gradients in that same pass (:func:`_chunked.fused_vjp`); one value per row
scans again in the backward pass (:func:`_chunked.recomputed_vjp`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxbce import _checks, _chunked, _core, _prepare, _reduce
from jaxbce._compile import compiled
from jaxbce._value_checks import in_range

_REDUCTIONS = ("mean", "sum")
# Gradients of arguments that every device holds whole: the sum of the devices' parts.
_SHARED = ("x", "eps")


class _Problem(NamedTuple):
    """What the scan knows statically."""

    names: tuple[str, ...]  # the arrays passed to the scanned function, in order
    batch: int
    classes: int  # this device's classes
    total_classes: int  # over every device of ``axis_name``
    chunk: int
    hard: bool  # bool/int labels or positive indices, no label smoothing
    eps: float | None  # a static label smoothing (None: 0 or traced)
    cdt: np.dtype  # the compute dtype
    scale: float  # the mean's 1 / count, or 1 for a sum
    per_row: bool  # axis=-1: one value per row
    axis_name: Any


# ----------------------------------------------------------------------- one block


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int], dtype: Any) -> jax.Array:
    """``a`` and ``b`` contracted over one axis each, accumulated in ``dtype``."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=dtype)


def _as_2d(a: jax.Array) -> jax.Array:
    """A scalar, ``[C]``, ``[1, C]`` or ``[B, 1]`` operand as ``[1|B, 1|C]``."""
    return a.reshape((1,) * (2 - a.ndim) + a.shape)


def _columns(a: jax.Array, start: jax.Array, chunk: int) -> jax.Array:
    """The block's columns of a 2-D array; a ``[.., 1]`` one unchanged."""
    return a if a.shape[1] == 1 else lax.dynamic_slice_in_dim(a, start, chunk, axis=1)


def _put_columns(buf: jax.Array, blk: jax.Array, start: jax.Array, fresh) -> jax.Array:
    """``buf`` with the block's columns replaced by ``blk`` in place; the overlap of the
    last block keeps what its predecessor wrote (``fresh=None``: no overlap)."""
    blk = blk.astype(buf.dtype)
    if fresh is not None:
        blk = jnp.where(fresh, blk, lax.dynamic_slice_in_dim(buf, start, blk.shape[1], axis=1))
    return lax.dynamic_update_slice_in_dim(buf, blk, start, axis=1)


def _indicator(p: _Problem, cols: jax.Array, start: jax.Array) -> jax.Array:
    """The block's 0/1 labels from ``[B, K]`` columns local to this device: one scatter
    of ``B * K`` ones. Repeats set the same entry; other blocks' columns and the -1 of
    ``pad`` or out-of-range indices are dropped."""
    local = cols - start
    local = jnp.where((cols >= 0) & (local >= 0) & (local < p.chunk), local, p.chunk)
    rows = jnp.arange(p.batch, dtype=jnp.int32)[:, None]
    ones = jnp.ones(local.shape, p.cdt)
    return jnp.zeros((p.batch, p.chunk), p.cdt).at[rows, local].set(ones, mode="drop")


def _block_inputs(p: _Problem, z: jax.Array, y, pw, wt, eps):
    """The block's labels converted and smoothed, ``pos_weight`` broadcast to the
    logits and ``weight``, all in the compute dtype."""
    y = _prepare.label_values(y).astype(p.cdt)
    if eps is not None:
        y = _prepare.smooth_labels(y, eps)
    pw = None if pw is None else jnp.broadcast_to(pw.astype(p.cdt), z.shape)
    return y, pw, (None if wt is None else wt.astype(p.cdt))


def _in_place(name: str, shape: tuple[int, ...]) -> bool:
    """Gradients written block by block in their argument's dtype (one value per
    column or element); the others are sums over blocks, kept in the compute dtype."""
    return name in ("w", "labels") or (name != "x" and len(shape) == 2 and shape[1] > 1)


def _value_and_grads(p: _Problem, wanted: Sequence[bool], ct: Any, *arrays: jax.Array):
    """The loss (``[]`` or ``[B]``) and the gradients of ``<ct, loss>``, one per array.

    ``ct`` None: the value alone. Gradients not ``wanted`` are None. Everything is
    summed over the fresh columns of each block (the last block's overlap once).
    """
    a = dict(zip(p.names, arrays, strict=True))
    want = {n for n, w in zip(p.names, wanted, strict=True) if w}
    if ct is None:
        want = set()
    x, w, cdt, chunk = a["x"], a["w"], p.cdt, p.chunk
    kernel = _core.kernel_for(p.hard, narrow=False)
    exact = p.classes % chunk == 0
    for name in ("weight", "pos_weight", "bias"):
        if name in a:
            a[name] = _as_2d(a[name])
    eps = a.get("eps", p.eps)
    cols = None
    if "positive_indices" in a:  # this device's columns; -1 for pad and out of range
        idx = a["positive_indices"]
        offset = 0 if p.axis_name is None else lax.axis_index(p.axis_name) * p.classes
        cols = jnp.where(in_range(idx, p.total_classes), idx, -1).astype(jnp.int32)
        cols = jnp.where(cols >= 0, cols - offset, -1)
    secondary = tuple(n for n in ("labels", "weight", "pos_weight", "eps") if n in want)
    coef = None
    if want:
        coef = jnp.asarray(ct, cdt) * jnp.asarray(p.scale, cdt)
        coef = coef[:, None] if p.per_row else coef

    zeros = functools.partial(_chunked.varying_zeros, axis_name=p.axis_name)
    carry = {"value": zeros((p.batch,) if p.per_row else (), cdt)}
    for n in sorted(want):
        v = a[n]
        carry[n] = zeros(v.shape, v.dtype if _in_place(n, v.shape) else cdt)

    def step(c, i):
        c = dict(c)
        start = _chunked.block_start(i, chunk, p.classes)
        fresh = None if exact else _chunked.fresh_columns(i, chunk, p.classes)[None, :]
        w_blk = _columns(w, start, chunk)
        z = _dot(x, w_blk, (1, 0), cdt)
        if "bias" in a:
            z = z + _columns(a["bias"], start, chunk).astype(cdt)
        raw = {
            "labels": _columns(a["labels"], start, chunk)
            if "labels" in a
            else _indicator(p, cols, start),
            "pos_weight": _columns(a["pos_weight"], start, chunk) if "pos_weight" in a else None,
            "weight": _columns(a["weight"], start, chunk) if "weight" in a else None,
            "eps": eps,
        }

        def prepared(**kw):
            r = raw | kw
            return _block_inputs(p, z, r["labels"], r["pos_weight"], r["weight"], r["eps"])

        y, pw, wt = prepared()
        if want & {"x", "w", "bias"}:
            loss, g = _core.value_and_dz(kernel, z, y, pw)
        else:
            loss, g = kernel(z, y, pw), None
        if wt is not None:
            loss = loss * wt
        if fresh is not None:
            loss = jnp.where(fresh, loss, jnp.zeros((), cdt))
        c["value"] = c["value"] + jnp.sum(loss, axis=1 if p.per_row else None)
        if not want:
            return c, None
        scale = coef if wt is None else coef * wt
        if g is not None:
            dz = g * scale
            if fresh is not None:
                dz = jnp.where(fresh, dz, jnp.zeros((), cdt))
            dz_in = dz.astype(x.dtype)  # the backward matmuls run in the inputs' dtype
            if "x" in want:
                c["x"] = c["x"] + _dot(dz_in, w_blk, (1, 1), cdt)
            if "w" in want:
                c["w"] = _put_columns(c["w"], _dot(x, dz_in, (0, 0), cdt), start, fresh)
            if "bias" in want:
                c["bias"] = _put_columns(c["bias"], jnp.sum(dz, 0, keepdims=True), start, fresh)
        if secondary:
            # the other inputs' gradients by autodiff through the core kernel's rule
            def weighted(*values):
                y, pw, wt = prepared(**dict(zip(secondary, values, strict=True)))
                out = kernel(z, y, pw)
                return out if wt is None else out * wt

            ct_blk = zeros(z.shape, cdt) + coef  # varying, as the block's loss
            if fresh is not None:
                ct_blk = jnp.where(fresh, ct_blk, jnp.zeros((), cdt))
            _, vjp = jax.vjp(weighted, *(raw[n] for n in secondary))
            for n, d in zip(secondary, vjp(ct_blk), strict=True):
                if _in_place(n, c[n].shape):
                    c[n] = _put_columns(c[n], d, start, fresh)
                else:
                    c[n] = c[n] + d.astype(cdt)
        return c, None

    steps = jnp.arange(_chunked.num_blocks(p.classes, chunk), dtype=jnp.int32)
    c, _ = lax.scan(step, carry, steps)
    value = c.pop("value")
    if p.axis_name is not None:
        value = lax.psum(value, p.axis_name)
    if p.scale != 1:
        value = value * jnp.asarray(p.scale, cdt)
    grads = []
    for name, orig in zip(p.names, arrays, strict=True):
        g = c.get(name)
        if g is not None:
            per_class = orig.ndim >= 1 and orig.shape[-1] == p.classes and orig.size == p.classes
            shared = name in _SHARED or (name in ("weight", "pos_weight") and not per_class)
            if shared and p.axis_name is not None:
                g = lax.psum(g, p.axis_name)
            g = g.reshape(orig.shape).astype(orig.dtype)
        grads.append(g)
    return value, tuple(grads)


def _fused(p: _Problem, wanted: Sequence[bool], *arrays: jax.Array):
    """:func:`_value_and_grads` for a scalar loss: its gradients for a cotangent of 1."""
    return _value_and_grads(p, wanted, 1.0 if any(wanted) else None, *arrays)


# --------------------------------------------------------------------- the function


def _check_numpy_indices(args: dict[str, Any]) -> None:
    """Index values given as NumPy arrays or lists, checked before ``jit`` traces them
    (single device: under ``axis_name`` the number of classes is known when tracing)."""
    idx, w = args["positive_indices"], args["w"]
    if (
        isinstance(idx, (np.ndarray, list, tuple))
        and args["axis_name"] is None
        and np.ndim(w) == 2
        and np.ndim(idx) == 2
    ):
        _checks.check_positive_indices_shape(idx, np.shape(idx)[0], np.shape(w)[1], args["pad"])


def _check_operand(v: Any, name: str, batch: int, classes: int, local: str) -> jax.Array | None:
    """``weight`` / ``pos_weight``: a scalar, ``[C]``, ``[1, C]`` or ``[B, 1]``."""
    if v is None:
        return None
    if not _checks.is_real_or_bool(_checks.dtype_of(v)):
        raise TypeError(f"{name} must be a real number array; got dtype {_checks.dtype_of(v)}.")
    v = jnp.asarray(v)
    if v.dtype == jnp.bool_ or jnp.issubdtype(v.dtype, jnp.integer):
        v = v.astype(jnp.float32)
    shape = v.shape
    ok = {(), (classes,), (1,), (1, classes), (batch, 1), (1, 1)}
    if shape == (batch, classes) and batch > 1 and classes > 1:
        raise ValueError(
            f"{name} of shape {shape} is a [B, C] array: it would hold as much memory as the "
            f"logits this function never forms. Give a scalar, [C] (per class), [1, C] or "
            f"[B, 1] (per sample) {name}, or use binary_cross_entropy_with_logits on the "
            f"materialized logits."
        )
    if shape not in ok:
        raise ValueError(
            f"{name} must be a scalar, [C], [1, C] or [B, 1] with B = {batch} and C = "
            f"{classes}{local}; got shape {shape}."
        )
    return v


@compiled(scalar_options=("label_smoothing", "pad"), precheck=_check_numpy_indices)
def linear_binary_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    positive_indices: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    pad: int = -1,
    weight: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    label_smoothing: float | ArrayLike = 0.0,
    axis: int | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    axis_name: Any = None,
) -> jax.Array:
    r"""Sigmoid BCE of the logits ``x @ w + bias``, without ever forming them.

    Equals :func:`binary_cross_entropy_with_logits` on the materialized logits
    :math:`z = x w + b` (and :func:`sparse_binary_cross_entropy_with_logits` for
    positive indices), with every option, in values and gradients:

    .. math::
        L = \frac{1}{BC} \sum_{b, c} w_{bc} \left[ w_{+,c}\, y_{bc}
            \operatorname{softplus}(-z_{bc}) + (1 - y_{bc}) \operatorname{softplus}(z_{bc})
            \right],

    .. math::
        \frac{\partial L}{\partial z_{bc}}
            = \frac{w_{bc}}{BC} \left[(1 - y_{bc})\,\sigma(z_{bc})
              - w_{+,c}\, y_{bc}\,\sigma(-z_{bc})\right].

    The classes are scanned in blocks of ``chunk_size``: each block's logits are formed
    by one matmul, the loss and ``dL/dz`` come from the core's accurate kernels in
    float32, and the block's gradients are made at once, ``dx += dz @ w_blk.T`` and
    ``dw_blk = x.T @ dz`` (written in place into ``dw``), with ``dbias_blk``. So
    ``value_and_grad`` of a scalar loss costs three matmuls and holds
    :math:`O(B \cdot \mathrm{chunk} + B H)` temporaries whatever ``C``: no ``[B, C]``
    array, and no ``[H, C]`` array beside ``dw``. The backward pass only scales the
    gradients by the cotangent. With ``axis=-1`` (one loss per row) the gradient of
    ``w`` mixes the rows by the cotangent, which the forward pass does not know: it
    computes the loss alone and the backward pass scans again (four matmuls in all).

    ``labels`` (``[B, C]``: float in [0, 1], bool, or integer with nonzero positive)
    or ``positive_indices`` (``[B, K]`` class indices padded with ``pad``; repeats count
    once; values outside ``[0, C)`` are ignored, rejected when given as NumPy arrays,
    checked under ``checkify`` by :func:`check_positive_indices`) give the targets.

    Class-parallel: inside ``shard_map`` (or ``pmap``) with ``axis_name`` set, ``w``,
    ``bias``, a ``[C]`` ``pos_weight`` or ``weight`` and ``labels`` hold this device's
    contiguous block of ``C_local`` classes (device ``i`` holds
    ``[i C_local, (i + 1) C_local)`` in the order of ``axis_name``), ``x`` and
    ``positive_indices`` (global class ids) are the same on every device. The result is
    the global loss on every device (a ``psum``, as is ``dx``); the gradients of the
    sharded arguments are this device's part of the single-device ones. No device
    gathers ``w``.

    Args:
      x: float ``[B, H]``, the features before the classifier.
      w: ``[H, C]``, the classifier's kernel (``nnx.Linear``'s layout), in ``x``'s dtype.
      labels: ``[B, C]`` labels (this device's ``[B, C_local]`` under ``axis_name``), or
        None when ``positive_indices`` is given.
      positive_indices: integer ``[B, K]`` indices of each row's positive classes.
      bias: optional ``[C]`` bias.
      pad: the padding value of ``positive_indices``, outside ``[0, C)`` (default -1).
      weight: optional weight: a scalar, ``[C]`` or ``[1, C]`` (per class) or
        ``[B, 1]`` (per sample). A ``[B, C]`` weight is refused.
      pos_weight: optional weight of the positive term, same shapes as ``weight``.
      label_smoothing: ``eps`` in [0, 1]; labels become ``y (1 - eps) + eps / 2``.
      axis: None (default) reduces over everything; ``-1`` (or 1) gives one value per
        row, ``[B]``.
      reduction: ``"mean"`` (default; over the ``B * C`` elements, or ``C`` per row
        with ``axis=-1``, also with a weight) or ``"sum"``.
      chunk_size: classes per block. None: the largest multiple of 128 with
        ``B * chunk_size <= 2**21`` (at least 128, at most ``C``): 4096 for
        ``B = 512``, 512 for ``B = 4096``, so that one block's float32 logits take at
        most 8 MiB. ``C`` need not be a multiple of it (the last block overlaps its
        predecessor).
      axis_name: the ``shard_map`` / ``pmap`` axis the classes are split over (a name
        or a tuple of names), or None.

    Returns:
      The loss, a scalar or ``[B]`` (``axis=-1``), in float32 (float64 for float64
      inputs). Gradients have the dtypes of their arguments.

    Raises:
      TypeError: non-float ``x``; ``w`` not of ``x``'s dtype; non-integer
        ``positive_indices``; a bad ``chunk_size``.
      ValueError: ``x`` not ``[B, H]``; ``w`` not ``[H, C]``; both or neither of
        ``labels`` and ``positive_indices``; ``labels`` not ``[B, C]``; a ``[B, C]`` or
        otherwise misshapen ``weight`` / ``pos_weight``; ``bias`` not ``[C]``;
        ``reduction`` not ``"mean"`` or ``"sum"`` (``"none"`` would form the logits);
        ``axis`` other than None or -1; ``label_smoothing`` outside [0, 1].

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jaxbce
      >>> x = jnp.array([[1.0, -0.5], [0.2, 2.0]])  # [B, H]
      >>> w = jnp.array([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])  # [H, C]
      >>> positives = jnp.array([[2, -1], [0, 1]])  # row 0: class 2; row 1: 0 and 1
      >>> loss, (dx, dw) = jax.value_and_grad(
      ...     jaxbce.linear_binary_cross_entropy, argnums=(0, 1)
      ... )(x, w, positive_indices=positives, chunk_size=2)
      >>> print(loss)
      0.37818313
      >>> print(dw)
      [[ 0.07153368  0.02649577 -0.00408012]
       [-0.05085438 -0.20568979  0.12606035]]

      The same as the loss on the materialized logits:

      >>> y = jnp.array([[0, 0, 1], [1, 1, 0]])
      >>> print(jax.grad(lambda w: jaxbce.binary_cross_entropy_with_logits(x @ w, y))(w))
      [[ 0.07153368  0.02649577 -0.00408012]
       [-0.05085438 -0.20568979  0.12606035]]

    References:
      Liger-Kernel's fused linear cross-entropy (gradients made in the forward pass,
      https://github.com/linkedin/Liger-Kernel); Cut Cross-Entropy (Wijmans et al.,
      2024, https://arxiv.org/abs/2411.09009). Both are softmax losses; this is the
      sigmoid (multi-label) counterpart.

    Notes:
      Mixed precision: with bfloat16 or float16 ``x`` and ``w`` the matmuls run in that
      dtype with float32 accumulation (``preferred_element_type``); the loss and
      ``dL/dz`` are float32; ``dL/dz`` is cast to the inputs' dtype for the two
      backward matmuls (the usual mixed-precision choice), and ``dx`` is accumulated
      over the blocks in float32.

      Differentiable once (``grad``, ``value_and_grad``, ``vjp``, under ``jit`` and
      ``jax.checkpoint``); second derivatives and forward mode (``jvp``, ``jacfwd``,
      ``hessian``) are not supported.
    """
    x = _checks.check_float_array(x, "x")
    if x.ndim != 2:
        raise ValueError(f"x must be [B, H] (rank 2); got shape {x.shape}.")
    batch, hidden = x.shape
    if not jnp.issubdtype(_checks.dtype_of(w), jnp.floating) or _checks.dtype_of(w) != x.dtype:
        raise TypeError(
            f"w must have x's dtype ({x.dtype}); got dtype {_checks.dtype_of(w)}. The "
            "matmuls run in the inputs' dtype: cast one of them explicitly."
        )
    w = jnp.asarray(w)
    if w.ndim != 2 or w.shape[0] != hidden:
        raise ValueError(
            f"w must be [H, C] with H = {hidden} to match x of shape {x.shape}; got w of "
            f"shape {w.shape}. (nnx.Linear's kernel is [in_features, out_features].)"
        )
    classes = w.shape[1]
    local = " (this device's classes)" if axis_name is not None else ""
    if (labels is None) == (positive_indices is None):
        raise ValueError(
            "give exactly one of labels ([B, C]) and positive_indices ([B, K]); got "
            + ("both." if labels is not None else "neither.")
        )
    if reduction == "none" or reduction == "weighted_mean":
        raise ValueError(
            f'reduction="{reduction}" is not available here: a per-element loss is the '
            f"[B, C] logits' size, which this function never forms. Use "
            f"binary_cross_entropy_with_logits(x @ w + bias, labels, "
            f'reduction="{reduction}") on the materialized logits.'
        )
    _checks.check_reduction(reduction, _REDUCTIONS)
    axes = _checks.normalize_axis(axis, 2)
    if axes not in (None, (0, 1), (1,)):
        raise ValueError(f"axis must be None (a scalar) or -1 (one value per row); got {axis!r}.")
    per_row = axes == (1,)
    _checks.check_scalar_option(label_smoothing, "label_smoothing")
    chunk = _chunked.chunk_size(batch, classes, chunk_size)
    cdt = _prepare.compute_dtype(x.dtype)
    devices = 1 if axis_name is None else int(lax.axis_size(axis_name))
    total = classes * devices

    arrays: dict[str, jax.Array] = {"x": x, "w": w}
    if bias is not None:
        bias = _checks.check_float_array(bias, "bias")
        if bias.shape != (classes,):
            raise ValueError(f"bias must be [C] with C = {classes}{local}; got shape {bias.shape}.")
        arrays["bias"] = bias
    if labels is not None:
        arrays["labels"] = _checks.check_labels(labels, (batch, classes), target=f"x @ w{local}")
    else:
        arrays["positive_indices"] = _checks.check_positive_indices_shape(
            positive_indices, batch, total, pad, target="x @ w"
        )
    for name, value in (("weight", weight), ("pos_weight", pos_weight)):
        v = _check_operand(value, name, batch, classes, local)
        if v is not None:
            arrays[name] = v
    static_zero = isinstance(label_smoothing, (int, float)) and label_smoothing == 0
    eps = None
    if not static_zero:
        if isinstance(label_smoothing, (int, float)):
            eps = float(label_smoothing)
        else:
            arrays["eps"] = jnp.asarray(label_smoothing)
    hard = positive_indices is not None or _checks.is_hard_dtype(arrays["labels"].dtype)
    count = batch * total if not per_row else total
    p = _Problem(
        names=tuple(arrays),
        batch=batch,
        classes=classes,
        total_classes=total,
        chunk=chunk,
        hard=hard and static_zero,
        eps=eps,
        cdt=cdt,
        scale=1.0 if reduction == "sum" else 1.0 / count,
        per_row=per_row,
        axis_name=axis_name,
    )
    if per_row:
        fn = _chunked.recomputed_vjp(functools.partial(_value_and_grads, p))
    else:
        fn = _chunked.fused_vjp(functools.partial(_fused, p))
    out = fn(*arrays.values())
    return out.astype(_reduce.output_dtype(x.dtype, reduction))
