"""Machinery of the losses whose logits never exist whole (fused linear, SigLIP).

Such a loss scans over blocks of columns of its logit matrix: each block's logits are
formed by a matmul, turned into the loss and ``p - y`` by the core's kernels, and
consumed at once by the matmuls of the gradients. Only one block is alive at a time.
The gradients are made in that same forward pass (:func:`fused_vjp`), so the backward
pass only scales them by the cotangent, as Liger-Kernel's fused linear cross-entropy
does: ``value_and_grad`` costs three matmuls, not four.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

# The default block holds at most this many logits: with their float32 loss, gradient
# and the block's matmul operands, a few times 8 MiB of temporaries, whatever the
# number of classes or pairs.
BLOCK_ELEMENTS = 1 << 21
# Blocks are a multiple of this many columns (a matmul tile on every backend).
BLOCK_ALIGN = 128


def chunk_size(rows: int, columns: int, requested: Any = None) -> int:
    """Columns per block for a ``[rows, columns]`` logit matrix.

    ``requested`` (a positive Python int) is taken as given, capped at ``columns``.
    None picks the largest multiple of :data:`BLOCK_ALIGN` with ``rows * chunk <=``
    :data:`BLOCK_ELEMENTS` (at least one multiple), capped at ``columns``: 4096 columns
    for 512 rows, 512 for 4096 rows.
    """
    if requested is not None:
        if not isinstance(requested, (int, np.integer)) or isinstance(requested, bool):
            raise TypeError(f"chunk_size must be a positive Python int or None; got {requested!r}.")
        if requested < 1:
            raise ValueError(f"chunk_size must be a positive int; got {requested}.")
        return int(min(requested, max(columns, 1)))
    chunk = max(BLOCK_ELEMENTS // max(rows, 1) // BLOCK_ALIGN, 1) * BLOCK_ALIGN
    return int(min(chunk, max(columns, 1)))


def num_blocks(columns: int, chunk: int) -> int:
    return -(-columns // chunk)


def block_start(index: jax.Array, chunk: int, columns: int) -> jax.Array:
    """Where block ``index`` starts: ``index * chunk``, except the last block, which
    ends at ``columns`` and so overlaps its predecessor when ``chunk`` does not divide
    ``columns``. No block needs padding, and a per-column result written with
    ``dynamic_update_slice`` lands in place (its overlap is written twice, the same)."""
    return jnp.minimum(index * chunk, columns - chunk)


def fresh_columns(index: jax.Array, chunk: int, columns: int) -> jax.Array:
    """``[chunk]`` bool: the columns of block ``index`` that no earlier block covered
    (all but the overlap of the last block); sums over columns keep only these."""
    start = block_start(index, chunk, columns)
    return start + jnp.arange(chunk, dtype=jnp.int32) >= index * chunk


def fused_vjp(value_and_grads: Callable[..., tuple[jax.Array, tuple]]) -> Callable[..., Any]:
    """A scalar function whose forward pass also makes its gradients.

    ``value_and_grads(wanted, *args)`` returns ``(value, grads)``, one gradient per
    argument in that argument's dtype: ``wanted[i]`` is True when argument ``i`` is
    differentiated, and its gradient may be None otherwise (the work is skipped). The result is a
    ``jax.custom_vjp`` whose backward pass multiplies those gradients by the scalar
    cotangent: differentiable once, not twice.
    """

    @jax.custom_vjp
    def fn(*args):
        return value_and_grads((False,) * len(args), *args)[0]

    def fwd(*primals):
        wanted = tuple(bool(p.perturbed) for p in primals)
        value, grads = value_and_grads(wanted, *(p.value for p in primals))
        return value, tuple(g if w else None for g, w in zip(grads, wanted, strict=True))

    def bwd(grads, ct):
        return tuple(None if g is None else _scale(g, ct) for g in grads)

    fn.defvjp(fwd, bwd, symbolic_zeros=True)
    return functools.wraps(value_and_grads)(fn)


def _scale(g: jax.Array, ct: jax.Array) -> jax.Array:
    """``ct * g`` computed in at least float32, returned in ``g``'s dtype (the
    gradient's dtype is its argument's)."""
    dt = jnp.float64 if g.dtype == jnp.float64 else jnp.float32
    return (ct.astype(dt) * g.astype(dt)).astype(g.dtype)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Flags:
    """Which arguments are differentiated, carried from ``fwd`` to ``bwd`` as static
    pytree structure (a residual with no array leaves)."""

    wanted: tuple[bool, ...]


def recomputed_vjp(value_and_grads: Callable[..., tuple[Any, tuple]]) -> Callable[..., Any]:
    """A function of any output shape whose backward pass runs the block scan again.

    ``value_and_grads(wanted, ct, *args)`` returns ``(value, grads)``: with ``ct=None``
    the value alone (``grads`` may be anything), else the gradients of ``<ct, value>``
    for the arguments ``wanted`` marks (None for the others), in each argument's dtype.
    When the cotangent is not a scalar (one loss per row), the gradient of a shared
    weight mixes the rows by ``ct`` and cannot be made before ``ct`` is known: the
    forward pass keeps only the arguments, and the backward pass forms every block's
    logits again, one more matmul than :func:`fused_vjp`. Differentiable once.
    """

    def value(*args):
        return value_and_grads((False,) * len(args), None, *args)[0]

    fn = jax.custom_vjp(value)

    def fwd(*primals):
        args = tuple(p.value for p in primals)
        return value(*args), (_Flags(tuple(bool(p.perturbed) for p in primals)), args)

    def bwd(res, ct):
        flags, args = res
        if isinstance(ct, SymbolicZero):
            return (None,) * len(args)
        grads = value_and_grads(flags.wanted, ct, *args)[1]
        return tuple(g if w else None for g, w in zip(grads, flags.wanted, strict=True))

    fn.defvjp(fwd, bwd, symbolic_zeros=True)
    return functools.wraps(value_and_grads)(fn)


def varying_zeros(shape: tuple[int, ...], dtype: Any, axis_name: Any = None) -> jax.Array:
    """Zeros to start a scan carry that accumulates per-device values.

    Under ``shard_map`` a carry must have the same type before and after a step; a sum
    of device-varying blocks is varying, so its initial zeros (a constant, invariant)
    are cast to varying over ``axis_name`` (a name or a tuple of names; None: no cast).
    """
    zeros = jnp.zeros(shape, dtype)
    return zeros if axis_name is None else jax.lax.pcast(zeros, axis_name, to="varying")
