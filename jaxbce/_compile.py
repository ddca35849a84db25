"""Each public loss compiled once per shapes and options, also when called outside jit.

Outside ``jit`` a loss would run op by op: every new shape compiles each primitive on
its own (about a second) and every call dispatches dozens of ops. :func:`compiled`
jits the function with its non-array arguments (options, Python scalars) static, and
caches one jitted function per set of options; ``jax.jit`` itself caches per shapes
and dtypes. Inside a user's ``jit``, ``grad`` or ``vmap`` it nests like any jitted
function. Trace-time checks still raise at the call, with the same messages.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import jax
import numpy as np

F = TypeVar("F", bound=Callable[..., Any])


def _is_array(v: Any) -> bool:
    return isinstance(v, (jax.Array, np.ndarray, np.generic))


def _is_numeric(v: Any) -> bool:
    return not isinstance(v, (np.ndarray, np.generic)) or v.dtype.kind in "biufc"


def _key(v: Any) -> Hashable:
    """A hashable key for a static argument that tells apart what the loss would
    (``True`` from ``1``, ``1`` from ``1.0``) and matches NaN with itself."""
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(_key(x) for x in v))
    if isinstance(v, float) and math.isnan(v):
        return (float, "nan")
    hash(v)
    return (type(v), v)


def compiled(
    *,
    scalar_options: tuple[str, ...] = (),
    precheck: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[[F], F]:
    """Decorator: call the loss through a cached ``jax.jit`` with non-array arguments
    static.

    ``scalar_options`` name arguments such as ``label_smoothing`` whose concrete 0-d
    array values are made static Python scalars, so that they are range-checked at the
    call as Python numbers are (traced ones are left to ``check_inputs``). ``precheck``
    gets the bound arguments before they are traced: checks of NumPy values there see
    the values (``jit`` would trace them). Arrays of a non-numeric dtype skip ``jit``, so
    that the loss's own check names them.
    """

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)
        cache: dict[Hashable, Callable[..., Any]] = {}

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            if precheck is not None:
                precheck(bound.arguments)
            if not all(map(_is_numeric, bound.arguments.values())):
                return fn(*args, **kwargs)
            static, dynamic = {}, {}
            for name, value in bound.arguments.items():
                if (
                    name in scalar_options
                    and _is_array(value)
                    and not isinstance(value, jax.core.Tracer)
                    and np.ndim(value) == 0
                ):
                    value = np.asarray(value).item()
                (dynamic if _is_array(value) else static)[name] = value
            try:
                key = tuple(sorted((k, _key(v)) for k, v in static.items()))
            except TypeError:  # unhashable option: let the loss's own checks answer
                return fn(*args, **kwargs)
            jitted = cache.get(key)
            if jitted is None:
                jitted = cache[key] = jax.jit(functools.partial(fn, **static))
            return jitted(**dynamic)

        return wrapper  # type: ignore[return-value]

    return decorate
