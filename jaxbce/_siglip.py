"""SigLIP's pairwise sigmoid loss without its ``[B, B]`` logits, on one device or a ring.

Each device scores its rows of ``x`` against one block of ``y`` at a time, and each
block chunk by chunk (``_chunked.py``): a chunk's logits are one matmul, the core's
hard-label kernel turns them into the loss and ``p - y``, and the gradient matmuls
consume them at once. The gradients are made in that same pass (``fused_vjp``). Under
``shard_map`` the ``y`` blocks travel round a ring of ``ppermute``, each with the
gradient accumulated for it so far, which ends on the device that owns the block.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxbce import _checks, _chunked, _core, _prepare
from jaxbce._compile import compiled


@compiled()
def siglip_loss(
    x: ArrayLike,
    y: ArrayLike,
    scale: ArrayLike,
    bias: ArrayLike,
    *,
    axis_name: Hashable | None = None,
    chunk_size: int | None = None,
) -> jax.Array:
    r"""SigLIP's sigmoid loss over all image-text pairs, never forming the ``[B, B]`` logits.

    For image embeddings :math:`x_i` and text embeddings :math:`y_j` (normalized by the
    caller), the logits and labels of the :math:`B^2` pairs are

    .. math::
        z_{ij} = t\, x_i \cdot y_j + b, \qquad
        \ell_{ij} = \begin{cases} +1 & i = j \\ -1 & i \ne j \end{cases}, \qquad
        L = -\frac{1}{B} \sum_{i,j} \log \sigma(\ell_{ij} z_{ij}),

    with :math:`t` = ``scale`` and :math:`b` = ``bias`` (SigLIP's learned
    :math:`\exp(t')` and :math:`b`), normalized by the global batch :math:`B` as
    big_vision does. Each term is the binary cross-entropy of :math:`z_{ij}` with label
    1 on the diagonal and 0 elsewhere, computed by the same kernels as
    :func:`binary_cross_entropy_with_logits`, and so is :math:`\partial L / \partial z
    = (\sigma(z) - [i = j]) / B`.

    The pairs are scored one ``[b, chunk]`` block at a time: the loss and the gradients
    w.r.t. ``x``, ``y``, ``scale`` and ``bias`` are all made in one pass (a
    ``jax.custom_vjp`` whose backward pass only scales them), at the cost of three
    matmuls (the logits, ``dz @ y`` and ``dz.T @ x``) and with temporaries linear in
    ``B``. Only what is differentiated is computed: the loss alone is one matmul.

    With ``axis_name``, call it inside ``shard_map`` with each device holding its
    ``b`` rows of ``x`` and ``y`` (global ``B = b * devices``): the ring of the SigLIP
    paper. At step ``k`` each device scores its ``x`` against the ``y`` block it holds
    (positives only in its own block), then passes the block, and the gradient
    accumulated for it, to its neighbour with ``lax.ppermute``; after ``devices``
    steps each block's gradient is back on its owner. Per-device memory is
    ``O(b * chunk + b * D)`` whatever the number of devices: no all-gather of ``y`` and
    no ``[b, B]`` array. Every device returns the global loss.

    Args:
      x: float ``[B, D]`` image embeddings (``[b, D]`` per device with ``axis_name``).
      y: float ``[B, D]`` text embeddings, the same shape and dtype as ``x``; row ``i``
        is the positive of row ``i`` of ``x``.
      scale: scalar temperature :math:`t` (SigLIP learns :math:`t'` with
        :math:`t = \exp(t')`).
      bias: scalar bias :math:`b`.
      axis_name: None on one device; inside ``shard_map``, the mesh axis (or tuple of
        axes) the batch is sharded over.
      chunk_size: columns per block, a positive int; None picks at most 2**21 logits
        per block, a multiple of 128 columns (512 columns for 4096 rows).

    Returns:
      The scalar loss, float32 (float64 for float64 inputs); with ``axis_name``, the
      global loss on every device.

    Raises:
      TypeError: ``x`` or ``y`` not floating point, or of different dtypes; ``scale``
        or ``bias`` not real numbers.
      ValueError: ``x`` not 2-D or with no rows; ``y`` of another shape; ``scale`` or
        ``bias`` not scalars; ``chunk_size`` not a positive int.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxbce
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
      >>> y = jnp.array([[0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
      >>> print(jaxbce.siglip_loss(x, y, 10.0, -10.0))
      1.438813
      >>> logits = 10.0 * x @ y.T - 10.0  # the same loss from the materialized logits
      >>> labels = jnp.eye(3, dtype=bool)
      >>> print(jaxbce.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / 3)
      1.4388129

    References:
      Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023
      (https://arxiv.org/abs/2303.15343), section 3.3 for the ring;
      big_vision ``trainers/proj/image_text/siglip.py`` for the normalization.

    Notes:
      First derivatives only: the backward pass scales gradients made in the forward
      pass, so Hessians are not available. Matmuls run in the inputs' dtype with
      float32 accumulation (``preferred_element_type``), at JAX's default matmul
      precision; the logits, loss and ``p - y`` are float32, and ``p - y`` is cast to
      the inputs' dtype (bfloat16 for bfloat16 inputs) for the two gradient matmuls.
      Gradients have the dtype of what they differentiate.
    """
    x, y = _check_embeddings(x, y)
    cdt = _prepare.compute_dtype(x.dtype)
    scale = _check_scalar(scale, "scale").astype(cdt)
    bias = _check_scalar(bias, "bias").astype(cdt)
    chunk = _chunked.chunk_size(x.shape[0], x.shape[0], chunk_size)
    return _fused(_axes(axis_name), chunk)(x, y, scale, bias)


# ------------------------------------------------------------------------- checks


def _check_embeddings(x: ArrayLike, y: ArrayLike) -> tuple[jax.Array, jax.Array]:
    x = _checks.check_float_array(x, "x")
    y = _checks.check_float_array(y, "y")
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D [B, D] array of embeddings; got shape {x.shape}.")
    if y.shape != x.shape:
        raise ValueError(
            f"y must have the shape of x, [B, D] (row i of y pairs with row i of x); got "
            f"x shape {x.shape} and y shape {y.shape}."
        )
    if y.dtype != x.dtype:
        raise TypeError(
            f"x and y must have the same dtype; got x {x.dtype} and y {y.dtype}. Cast one "
            f"explicitly."
        )
    if x.shape[0] == 0:
        raise ValueError(f"x must have at least one row; got shape {x.shape}.")
    return x, y


def _check_scalar(value: Any, name: str) -> jax.Array:
    dt = _checks.dtype_of(value)
    if (
        isinstance(value, (str, bytes))
        or dt == jnp.bool_
        or not (jnp.issubdtype(dt, jnp.floating) or jnp.issubdtype(dt, jnp.integer))
    ):
        raise TypeError(f"{name} must be a real number; got {value!r} of dtype {dt}.")
    if np.ndim(value) != 0:
        raise ValueError(
            f"{name} must be a scalar; got shape {np.shape(value)} (use {name}.squeeze() "
            f"or {name}[0] for a one-element parameter)."
        )
    return jnp.asarray(value)


def _axes(axis_name: Any) -> tuple | None:
    """``axis_name`` as a tuple of mesh axes (None: one device)."""
    if axis_name is None:
        return None
    axes = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
    if not axes:
        raise ValueError("axis_name must name at least one mesh axis; got ().")
    return axes


# ------------------------------------------------------- varying values under shard_map


def _varying_axes(v: jax.Array) -> frozenset:
    """The mesh axes along which ``v`` differs between devices (inside ``shard_map``)."""
    aval = jax.typeof(v)
    manual = getattr(aval, "manual_axis_type", None)
    return manual.varying if manual is not None else frozenset(getattr(aval, "vma", ()))


def _as_varying(v: jax.Array, axes: tuple | None) -> jax.Array:
    """``v``, device-varying along ``axes``: a scan carry or ``ppermute`` needs it."""
    if axes is None:
        return v
    missing = tuple(a for a in axes if a not in _varying_axes(v))
    return lax.pcast(v, missing, to="varying") if missing else v


def _like_primal(g: jax.Array, primal: jax.Array, axes: tuple | None) -> jax.Array:
    """A device's share of a gradient, summed over the axes along which its primal is
    the same on every device (``scale``, ``bias``): the transpose of using one value
    on every device."""
    if axes is None:
        return g
    shared = tuple(a for a in axes if a not in _varying_axes(primal))
    return lax.psum(g, shared) if shared else g


# ---------------------------------------------------------------------- the pairs


class _Sums(NamedTuple):
    """What a device accumulates over the pairs it scores, in the compute dtype, not
    yet divided by ``B`` nor (``dx``, ``dy``) multiplied by ``scale``, both linear and
    applied once at the end; None for a gradient that is not wanted."""

    loss: jax.Array  # sum of the pairs' losses
    dx: jax.Array | None  # [b, D]: sum_j dz_ij y_j
    dscale: jax.Array | None  # sum dz_ij (x_i . y_j)
    dbias: jax.Array | None  # sum dz_ij


def _contract(a: jax.Array, b: jax.Array, dims: tuple[int, int], dtype: Any) -> jax.Array:
    """``a`` times ``b`` contracting ``a``'s axis ``dims[0]`` with ``b``'s ``dims[1]``,
    in the operands' dtype with ``dtype`` accumulation."""
    return lax.dot_general(a, b, (((dims[0],), (dims[1],)), ((), ())), preferred_element_type=dtype)


def _score_block(
    x: jax.Array,
    held: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    sums: _Sums,
    dy: jax.Array | None,
    *,
    diagonal: bool,
    chunk: int,
) -> tuple[_Sums, jax.Array | None]:
    """Scores ``x`` against the ``y`` block ``held``, ``chunk`` columns at a time.

    ``diagonal``: ``held`` is ``x``'s own block, whose pair ``(i, i)`` is positive;
    every other pair is negative. Adds to ``sums`` and to ``dy`` (``[b, D]``,
    ``sum_i dz_ij x_i`` for the rows ``j`` of ``held``). The last chunk overlaps its
    predecessor when ``chunk`` does not divide ``b``: its repeated columns get
    ``dz = 0`` and a loss of 0, so nothing is counted twice.
    """
    cols = held.shape[0]
    cdt = scale.dtype
    kernel = _core.kernel_for(hard=True, narrow=False)  # float32 logits, labels 0 or 1
    zero = jnp.zeros((), cdt)

    def step(carry, i):
        sums, dy = carry
        start = _chunked.block_start(i, chunk, cols)
        fresh = _chunked.fresh_columns(i, chunk, cols)[None, :]
        y_blk = lax.dynamic_slice_in_dim(held, start, chunk)
        m = _contract(x, y_blk, (1, 1), cdt)  # [b, chunk] = x @ y_blk.T
        z = scale * m + bias
        if diagonal:
            row = lax.broadcasted_iota(jnp.int32, z.shape, 0)
            col = lax.broadcasted_iota(jnp.int32, z.shape, 1) + start
            labels = (row == col).astype(cdt)
        else:
            labels = jnp.zeros_like(z)
        if sums.dscale is None and sums.dbias is None and sums.dx is None and dy is None:
            loss = jnp.where(fresh, kernel(z, labels, None), zero)
            return (sums._replace(loss=sums.loss + jnp.sum(loss)), dy), None
        loss, dz = _core.value_and_dz(kernel, z, labels, None)
        loss, dz = jnp.where(fresh, loss, zero), jnp.where(fresh, dz, zero)
        dz_in = dz.astype(x.dtype)  # the gradient matmuls run in the inputs' dtype
        new = _Sums(
            loss=sums.loss + jnp.sum(loss),
            dx=None if sums.dx is None else sums.dx + _contract(dz_in, y_blk, (1, 0), cdt),
            dscale=None if sums.dscale is None else sums.dscale + jnp.sum(dz * m),
            dbias=None if sums.dbias is None else sums.dbias + jnp.sum(dz),
        )
        if dy is not None:
            g = _contract(dz_in, x, (0, 0), cdt)  # [chunk, D] = dz.T @ x
            dy = lax.dynamic_update_slice_in_dim(
                dy, lax.dynamic_slice_in_dim(dy, start, chunk) + g, start, axis=0
            )
        return (new, dy), None

    steps = jnp.arange(_chunked.num_blocks(cols, chunk), dtype=jnp.int32)
    (sums, dy), _ = lax.scan(step, (sums, dy), steps)
    return sums, dy


def _value_and_grads(
    wanted: tuple[bool, ...],
    x: jax.Array,
    y: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    axes: tuple | None,
    chunk: int,
) -> tuple[jax.Array, tuple]:
    """The loss and the gradients in ``wanted``, on one device or round the ring."""
    want_x, want_y, want_scale, want_bias = wanted
    rows, dim = x.shape
    cdt = scale.dtype
    n = 1 if axes is None else lax.axis_size(axes)

    def start(shape: tuple[int, ...]) -> jax.Array:
        return _chunked.varying_zeros(shape, cdt, axes)

    def fresh_dy() -> jax.Array | None:
        return start((rows, dim)) if want_y else None

    sums = _Sums(
        loss=start(()),
        dx=start((rows, dim)) if want_x else None,
        dscale=start(()) if want_scale else None,
        dbias=start(()) if want_bias else None,
    )
    score = functools.partial(_score_block, x, scale=scale, bias=bias, chunk=chunk)
    if n == 1:
        sums, dy = score(y, sums=sums, dy=fresh_dy(), diagonal=True)
    else:
        # Device j passes what it holds to device j - 1. A block's next hop is sent
        # before the block is scored (the transfer overlaps the matmuls); its gradient
        # is sent once this device has added its share.
        perm = [(j, (j - 1) % n) for j in range(n)]

        def send(v: jax.Array | None) -> jax.Array | None:
            return None if v is None else lax.ppermute(v, axes, perm)

        def hop(sums, held, dy, *, diagonal: bool, last: bool):
            ahead = None if last else send(held)
            sums, mine = score(held, sums=sums, dy=fresh_dy(), diagonal=diagonal)
            dy = mine if dy is None or mine is None else dy + mine
            return sums, ahead, send(dy)

        sums, held, dy = hop(sums, _as_varying(y, axes), None, diagonal=True, last=False)
        if n > 2:

            def body(carry, _):
                return hop(*carry, diagonal=False, last=False), None

            (sums, held, dy), _ = lax.scan(body, (sums, held, dy), length=n - 2)
        sums, _, dy = hop(sums, held, dy, diagonal=False, last=True)

    total = rows * n  # the global batch
    loss = sums.loss if axes is None else lax.psum(sums.loss, axes)
    factor = scale / total
    grads = (
        None if sums.dx is None else _like_primal((factor * sums.dx).astype(x.dtype), x, axes),
        None if dy is None else _like_primal((factor * dy).astype(y.dtype), y, axes),
        None if sums.dscale is None else _like_primal(sums.dscale / total, scale, axes),
        None if sums.dbias is None else _like_primal(sums.dbias / total, bias, axes),
    )
    return loss / total, grads


@functools.cache
def _fused(axes: tuple | None, chunk: int):
    """The custom_vjp of ``(x, y, scale, bias)`` for one ring and chunk size."""
    return _chunked.fused_vjp(functools.partial(_value_and_grads, axes=axes, chunk=chunk))
