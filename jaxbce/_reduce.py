"""Weighting, masking and reduction of an element-wise loss, shared by every loss.

Reductions accumulate in the compute dtype (at least float32) and return it: a sum of
16-bit losses would overflow float16 at 65504 and lose bits in bfloat16, so, as under
PyTorch's autocast, reduced losses of 16-bit logits are float32. ``"none"`` returns
the logits' dtype, and gradients always have the dtype of what they differentiate.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbce._prepare import Prepared, compute_dtype, is_narrow

# The first stage of :func:`sum_all` on GPU and TPU sums rows of this many elements,
# measured fastest on an H100 (docs/performance.md): with 512, one warp sums a row,
# which the latency-bound kernels of 16-bit logits need.
SUM_ROWS = 1024
SUM_ROWS_NARROW = 512


def output_dtype(dtype: Any, reduction: str) -> np.dtype:
    """The loss's dtype: the logits' for ``"none"``, else at least float32."""
    return np.dtype(dtype) if reduction == "none" else compute_dtype(dtype)


def sum_rows_for(dtype: Any) -> int:
    """The row length of :func:`sum_all` for a loss whose logits have ``dtype``."""
    return SUM_ROWS_NARROW if is_narrow(dtype) else SUM_ROWS


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def sum_all(x: jax.Array, rows: int = SUM_ROWS) -> jax.Array:
    """``jnp.sum(x)``, written so that on a GPU XLA fuses it with the element-wise work
    producing ``x`` into one kernel at the memory limit.

    XLA:GPU turns one large sum into a ``[16384, 16384]`` row reduction whose fused side
    outputs (the gradient) run well below copy speed; summing ``[N / rows, rows]`` rows,
    then the row sums, does not. The optimization barrier keeps XLA from merging the two
    sums again; the JVP is the plain sum, so the barrier never reaches a derivative. CPU
    and TPU keep the single sum: XLA:CPU's reduction fusion wants it, and XLA:TPU writes
    the rows' partial sums as an array of ``N / 8`` floats or more (one 128-lane vector
    per row), where the single sum fuses with no temporary. So does an ``N`` that is not
    a multiple of ``rows``.
    """
    if x.size == 0 or x.size % rows:
        return jnp.sum(x)
    return jax.lax.platform_dependent(
        x, cpu=jnp.sum, tpu=jnp.sum, default=functools.partial(sum_by_rows, rows=rows)
    )


def sum_by_rows(x: jax.Array, rows: int = SUM_ROWS) -> jax.Array:
    """The sum of the sums of ``[x.size / rows, rows]`` rows, with an optimization
    barrier between the two (``x.size`` must be a multiple of ``rows``)."""
    partial = jnp.sum(x.reshape(-1, rows), axis=1)
    return jnp.sum(jax.lax.optimization_barrier(partial))


@sum_all.defjvp
def _sum_all_jvp(rows, primals, tangents):
    return sum_all(primals[0], rows), jnp.sum(tangents[0])


def _sum(x: jax.Array, axis: tuple[int, ...] | None, dtype: Any) -> jax.Array:
    return sum_all(x, sum_rows_for(dtype)) if axis is None else jnp.sum(x, axis=axis)


def denominator(
    shape: tuple[int, ...],
    *,
    weight: jax.Array | None,
    mask: jax.Array | None,
    axis: tuple[int, ...] | None,
    reduction: str,
    dtype: Any,
) -> jax.Array | int:
    """What a mean divides by: the number of selected entries (``"mean"``, also with a
    weight, as PyTorch), or their summed weight (``"weighted_mean"``); never 0 (an empty
    mean is 0, not NaN). An int when no mask or weight makes it data-dependent."""
    if reduction == "weighted_mean" and weight is not None:
        count = weight if mask is None else jnp.where(mask, weight, jnp.zeros((), weight.dtype))
    elif mask is not None:
        count = mask.astype(compute_dtype(dtype))
    else:
        return max(int(np.prod(shape if axis is None else [shape[a] for a in axis])), 1)
    count = _sum(count, axis, dtype)
    return jnp.where(count == 0, jnp.ones((), count.dtype), count)


def reduce_loss(
    loss: jax.Array,
    *,
    weight: jax.Array | None,
    mask: jax.Array | None,
    axis: tuple[int, ...] | None,
    reduction: str,
    dtype: Any,
) -> jax.Array:
    """Weights, masks and reduces an element-wise loss computed in its compute dtype;
    ``dtype`` is the logits' (see :func:`output_dtype`)."""
    if weight is not None:
        loss = loss * weight
    if mask is not None:
        loss = jnp.where(mask, loss, jnp.zeros((), loss.dtype))
    out = output_dtype(dtype, reduction)
    if reduction == "none":
        return loss.astype(out)
    total = _sum(loss, axis, dtype)
    if reduction == "sum":
        return total.astype(out)
    count = denominator(
        loss.shape, weight=weight, mask=mask, axis=axis, reduction=reduction, dtype=dtype
    )
    return (total / count).astype(out)


def finish(loss: jax.Array, p: Prepared, reduction: str) -> jax.Array:
    """:func:`reduce_loss` with the weight, mask, axis and dtype of ``p``."""
    return reduce_loss(
        loss, weight=p.weight, mask=p.mask, axis=p.axis, reduction=reduction, dtype=p.dtype
    )
