"""Probe: the mean BCE and its gradient as one Pallas (Triton) kernel.

XLA's code for the fused loss + gradient of 16-bit logits takes about 46 instructions
per element with one-byte labels (``sass_deviceless.py``): XLA emits no fused
multiply-add for jnp arithmetic. That is more than an H200's SMs can issue in the time
its memory moves 5 bytes at 90% of copy (docs/performance.md). This probe
writes the same math as a Pallas kernel lowered by Triton, which contracts multiply-adds
and shares one ``exp``: one pass reads logits and labels, writes the gradient and one
partial sum per row. A ``custom_vjp`` makes it the mean loss: its backward multiplies
the saved gradient by the cotangent, which XLA folds away under ``value_and_grad`` (the
cotangent is the constant 1).

Not part of the library: no Hessians, no label gradients, no options. The math is the
table's GPU formulations for 16-bit logits (``_core.FORMULATIONS``), so results match
jaxbce's within their accuracy bounds.

    python -m experiments.pallas_fused --check        # CPU: interpret mode vs jaxbce
    python -m experiments.pallas_fused --sass         # no GPU: SASS per element, H200
    python -m experiments.pallas_fused --time         # one GPU: vs jaxbce and a copy
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import shutil  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plt  # noqa: E402

import jaxbce  # noqa: E402
from jaxbce import _elementwise as ew  # noqa: E402

COLS = 1024  # the data as [N / COLS, COLS]
BLOCK = (8, 4)  # rows per program, warps per program
BLOCKS = ((8, 4), (16, 4), (16, 8), (32, 8))  # --time: tried for bf16 with FMAs


def _fma(a, b, c):
    """``a * b + c`` rounded once (PTX ``fma.rn.f32``; GPU only, no interpret mode)."""
    (out,) = plt.elementwise_inline_asm(
        "fma.rn.f32 $0, $1, $2, $3;",
        args=[a, b, c],
        constraints="=r,r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)],
    )
    return out


def _log1p_fma(x):
    """``ew.log1p_unit`` with its nine multiply-adds as FMAs."""
    p = jnp.full(x.shape, ew.LOG1P_Q[-1], x.dtype)
    for c in ew.LOG1P_Q[-2::-1]:
        p = _fma(p, x, jnp.full(x.shape, c, x.dtype))
    return _fma(x, x * p, x)


def _kernel(z_ref, y_ref, g_ref, s_ref, *, scale: float, hard: bool, fma: bool):
    """One block: the loss's row sums and the gradient of the mean, from one
    ``e = exp(-|z|)`` (the math of ``_core``'s ``hard-narrow`` and ``fused-narrow``);
    ``fma``: the polynomial in fused multiply-adds."""
    z = z_ref[...].astype(jnp.float32)
    e = jnp.exp(ew.neg_abs(z))
    lg = _log1p_fma(e) if fma else ew.log1p_unit(e)
    r = ew.recip_unit(1 + e)
    if hard:
        pos = y_ref[...] != 0
        wrong = pos != (z >= 0)
        loss = jnp.where(wrong, jnp.abs(z), 0.0) + lg
        s = jnp.where(wrong, r, e * r)
        g = jnp.where(pos, -s, s)
    else:
        a, b = ew.coefficients(y_ref[...].astype(jnp.float32), None)
        relu_z, relu_neg_z = ew.relus_max(z)
        loss = lg + ew.times(a, relu_z) + ew.times(b, relu_neg_z)
        s_pos, s_neg = ew.sigmoids(z, e, r)
        g = a * s_pos - b * s_neg
    g_ref[...] = (g * scale).astype(g_ref.dtype)
    s_ref[...] = jnp.sum(loss, axis=1)


def _call(z, y, *, interpret: bool, fma: bool, block: tuple[int, int]):
    rows, cols = z.shape
    kernel = functools.partial(_kernel, scale=1.0 / z.size, hard=y.dtype != jnp.float32, fma=fma)
    rows_per, warps = block
    block = pl.BlockSpec((rows_per, cols), lambda i: (i, 0))
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct(z.shape, z.dtype),
            jax.ShapeDtypeStruct((rows,), jnp.float32),
        ),
        grid=(rows // rows_per,),
        in_specs=[block, block],
        out_specs=(block, pl.BlockSpec((rows_per,), lambda i: (i,))),
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
    )(z, y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def mean_bce(z, y, interpret: bool = False, fma: bool = False, block=BLOCK) -> jax.Array:
    """The mean BCE of ``[R, COLS]`` logits ``z`` and labels ``y``; ``block``: rows and
    warps per program (R a multiple of its rows)."""
    return _fwd(z, y, interpret, fma, block)[0]


def _fwd(z, y, interpret, fma, block):
    g, sums = _call(z, y, interpret=interpret, fma=fma, block=block)
    return jnp.sum(sums) / z.size, g


def _bwd(interpret, fma, block, g, ct):
    return g * ct.astype(g.dtype), None


mean_bce.defvjp(_fwd, _bwd)


def _inputs(n: int, logits: str, labels: str):
    rng = np.random.default_rng(0)
    z = (2 * rng.standard_normal((n // COLS, COLS), np.float32)).astype(
        {"f32": np.float32, "bf16": jnp.bfloat16}[logits]
    )
    y = rng.random(z.shape) < 0.3
    y = {"f32": y.astype(np.float32), "bool": y, "int8": y.astype(np.int8)}[labels]
    return jnp.asarray(z), jnp.asarray(y)


PAIRS = [(z, y) for z in ("f32", "bf16") for y in ("f32", "bool", "int8")]


def check(n: int = 1 << 16) -> None:
    """Interpret mode on this machine against jaxbce (which runs its CPU formulation)."""
    for logits, labels in PAIRS:
        z, y = _inputs(n, logits, labels)
        v, g = jax.jit(jax.value_and_grad(lambda z, y: mean_bce(z, y, True)))(z, y)
        v0, g0 = jax.jit(jax.value_and_grad(jaxbce.binary_cross_entropy_with_logits))(z, y)
        print(f"  values {float(v):.9g} {float(v0):.9g}")
        gf, g0f = np.asarray(g, np.float64), np.asarray(g0, np.float64)
        err_v = abs(float(v) - float(v0)) / abs(float(v0))
        err_g = np.max(np.abs(gf - g0f)) / np.max(np.abs(g0f))
        tol = 1e-6 if logits == "f32" else 1e-2  # a bf16 gradient has 8 bits
        ok = err_v < 1e-6 and err_g < tol
        print(f"{logits}/{labels}: loss rel. err {err_v:.1e}, gradient {err_g:.1e} "
              f"{'ok' if ok else 'FAIL'}")  # fmt: skip
        assert ok


def sass(device: str = "H200") -> None:
    """Static SASS of the kernel, compiled for ``device`` without a GPU."""
    from benchmarks import fusion
    from experiments import sass_deviceless as sd

    target = fusion.gpu(fusion.target_config(device))
    cuobjdump = shutil.which("cuobjdump") or "cuobjdump"
    n = 1 << 28
    for (logits, labels), fma in ((p, f) for p in PAIRS for f in (False, True)):
        zd = {"f32": jnp.float32, "bf16": jnp.bfloat16}[logits]
        yd = {"f32": jnp.float32, "bool": jnp.bool_, "int8": jnp.int8}[labels]
        shape = (n // COLS, COLS)
        fn = jax.value_and_grad(functools.partial(mean_bce, interpret=False, fma=fma))
        shapes = [(shape, zd), (shape, yd)]
        compile_fn = functools.partial(fusion.compile_for, fn, target, shapes)
        compiled, stats = sd.kernel_sass(compile_fn, n, cuobjdump)
        temp = compiled.memory_analysis().temp_size_in_bytes / n
        print(f"{device} {logits}/{labels}{' fma' if fma else ''}: "
              f"{stats['sass_per_element']:.1f} SASS ({stats['elements_per_thread']} per "
              f"thread), MUFU {stats['mufu_per_element']}, temp {temp:.3f} B/element")  # fmt: skip


def time(n: int = 1 << 28, repeats: int = 30) -> None:
    """value_and_grad of the mean at ``n``: this kernel (with FMAs, for bf16 logits in
    each of BLOCKS), jaxbce and a copy, interleaved."""
    from benchmarks import bench, impls

    for logits, labels in PAIRS:
        z, y = _inputs(n, logits, labels)
        case = impls.Case(n, logits, labels)
        copy = impls.copy_fn(case)
        blocks = BLOCKS if logits == "bf16" else (BLOCK,)
        fns = {"pallas": jax.jit(jax.value_and_grad(mean_bce))}
        for block in blocks:
            kernel = functools.partial(mean_bce, interpret=False, fma=True, block=block)
            fns[f"pallas-fma-{block[0]}x{block[1]}"] = jax.jit(jax.value_and_grad(kernel))
        fns["jaxbce"] = jax.jit(jax.value_and_grad(jaxbce.binary_cross_entropy_with_logits))
        fns["copy"] = jax.jit(functools.partial(copy, aux=None))
        runners = {k: (functools.partial(f, z, y), jax.block_until_ready) for k, f in fns.items()}
        v0, g0 = fns["jaxbce"](z, y)
        g0 = np.asarray(g0, np.float64)
        for name in (k for k in fns if k.startswith("pallas")):  # the GPU's code vs jaxbce's
            v, g = fns[name](z, y)
            err_g = np.max(np.abs(np.asarray(g, np.float64) - g0)) / np.max(np.abs(g0))
            print(f"{logits}/{labels} {name}: loss rel. err "
                  f"{abs(float(v) / float(v0) - 1):.1e}, gradient {err_g:.1e}")  # fmt: skip
        t = bench.time_interleaved(runners, repeats=repeats, in_flight=8)
        ms = {k: 1e3 * float(np.median(v)) for k, v in t.items()}
        print(f"{logits}/{labels}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
              + "; % of copy: " + ", ".join(f"{k} {100 * ms['copy'] / v:.1f}"
                                            for k, v in ms.items() if k != "copy"),
              flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sass", action="store_true")
    ap.add_argument("--time", action="store_true")
    args = ap.parse_args()
    if args.check:
        check()
    if args.sass:
        sass()
    if args.time:
        time()


if __name__ == "__main__":
    main()
