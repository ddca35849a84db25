"""Probe: how the mean's reduction is written decides whether the fused loss + gradient
kernel runs at the copy limit. One size, every dtype pair, several formulations side by
side, each checked against jaxbce's own result and its compiled HLO saved.

    python -m experiments.formulations --log2n 28 --out DIR      # on a GPU

Formulations (value_and_grad of the mean w.r.t. the logits unless said otherwise):

- ``current``: ``jaxbce.binary_cross_entropy_with_logits`` as shipped.
- ``NAME-R``: the kernel made (``_core.make_kernel``) from the GPU formulation ``NAME`` of
  jaxbce's table (``_core.FORMULATIONS``: ``fused``, ``fused-narrow`` for float labels,
  ``hard``, ``hard-narrow`` for bool/int labels), summed over rows of ``R`` elements, then
  the row sums.
- ``lean-V-S`` (bool/int labels): the hard kernel for 16-bit logits written in other
  ways (``V``, :data:`LEAN`, built here from ``_elementwise``): ``div`` divides for
  ``1/(1+e)``, ``rsq`` takes it from ``rsqrt`` squared and a Newton step, ``rsq0`` from
  ``rsqrt`` squared alone (what jaxbce ships), ``sign`` folds the label's sign into the
  cotangent, ``qD`` uses a ``log1p`` polynomial of lower degree ``D``; summed as ``S``
  (:data:`LAYOUTS`): rows of ``R`` elements (``rows-R``), the columns of ``[N / C, C]``
  (``cols-C``) or the ``C`` rows of ``[C, N / C]`` (``tcols-C``), then those sums.
- ``fwd-S`` (forward only, the loss value): jaxbce's 16-bit kernel summed as ``S``
  (:data:`FWD_LAYOUTS`), ``fwd-current`` the public function, ``fwd-optax`` optax's
  loss. With float labels also ``fwd-cpuform`` and ``vg-cpuform``: the CPU loss with the
  GPU gradient.
- ``grad-only``: only the gradient (the loss value discarded, so XLA drops it): the
  element-wise part alone, in a loop fusion. ``nomath-512``: the reduction with the
  gradient as a side output and almost no math.
- ``copy``: the bytes of value_and_grad with no math (read logits and labels, write an
  array of the logits' dtype): the limit. ``peak-f32``: a float32 copy of N elements
  (8 B/element), the device's bandwidth.

``--accuracy`` measures each kernel's ulp error on this device against float64, and over
every finite bfloat16 and float16 logit how many of its results, rounded to that dtype,
miss the correctly rounded value; ``--only REGEX`` restricts the variants;
``experiments/probe_gpu.sh`` runs this and Nsight Compute in one device call. The logs in
``experiments/results/gpu-formulations/`` come from earlier versions of this probe, whose
variant names differ (``gen-xla``/``gen-poly``, ``hard-xla``/``hard-poly``: the table's
formulations with XLA's or jaxbce's ``log1p``).

Writes ``formulations.json`` and ``hlo.tar.gz`` (every variant's optimized HLO) to
``--out``.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tarfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxbce  # noqa: E402
from benchmarks import bench, hlo, impls  # noqa: E402
from jaxbce import _core, _prepare, _reduce  # noqa: E402
from jaxbce import _elementwise as ew  # noqa: E402

ROWS = (512, 1024, 4096)


def _rows_sum(size: int):
    """jaxbce's two-stage sum (``_reduce.sum_all``) over rows of ``size`` elements."""
    return functools.partial(_reduce.sum_all, rows=size)


def _cols_sum(shape: tuple[int, int]):
    """A two-stage sum down the columns of ``x.reshape(shape)``, then the column sums."""

    @jax.custom_jvp
    def total(x):
        partial = jnp.sum(x.reshape(shape), axis=0)
        return jnp.sum(jax.lax.optimization_barrier(partial))

    total.defjvp(lambda p, t: (total(p[0]), jnp.sum(t[0])))
    return total


def _sum_for(layout: str):
    """``rows-R``: :func:`_rows_sum`; ``cols-C`` and ``tcols-C``: :func:`_cols_sum` of
    ``[N / C, C]`` and of ``[C, N / C]``."""
    kind, size = layout.split("-")
    size = int(size)
    if kind == "rows":
        return _rows_sum(size)
    return _cols_sum((-1, size) if kind == "cols" else (size, -1))


def _table_kernel(name: str):
    """The kernel of the table's GPU formulation ``name`` (on the GPU; the CPU one on CPU)."""
    form = next(f for f in _core.FORMULATIONS.values() if f.name == name)
    return _core.make_kernel(form)


def _without_pw(kernel):
    return lambda z, y: kernel(z, y, None)


def _recip_rsqrt(u, newton=True):
    """1/u for u in [1, 2]: rsqrt(u)**2 (one special-function op), and a Newton step."""
    r0 = jax.lax.rsqrt(u)
    r0 = r0 * r0
    return r0 + r0 * (1 - u * r0) if newton else r0


def _exp(x, rtol):
    """``exp(x)``, with XLA free to use a faster form within ``rtol`` where given."""
    return jnp.exp(x) if rtol is None else jax.lax.exp(x, accuracy=jax.lax.Tolerance(rtol=rtol))


# Coefficients of q in log1p(x) = x + x**2 q(x) on [0, 1] of lower degree than jaxbce's
# (degree 7), fitted by experiments/fit_log1p.py: largest relative errors without fused
# multiply-adds 3.3e-7 (degree 6), 1.5e-6 (5), 9.8e-6 (4).
_Q = {
    6: (
        -0.4999817907810211,
        0.33284062147140503,
        -0.2453686147928238,
        0.17847192287445068,
        -0.10902267694473267,
        0.04498647525906563,
        -0.008778907358646393,
    ),
    5: (
        -0.4999074637889862,
        0.3314042389392853,
        -0.23611332476139069,
        0.15102747082710266,
        -0.0678509995341301,
        0.014588250778615475,
    ),
    4: (
        -0.49953946471214294,
        0.32622599601745605,
        -0.21240390837192535,
        0.10359229892492294,
        -0.02473440207540989,
    ),
}


def _log1p_q(degree: int):
    """``log1p(x)`` on [0, 1] as ``x + x**2 q(x)`` with ``q`` of ``degree`` (7: jaxbce's)."""
    if degree == 7:
        return ew.log1p_unit
    q = _Q[degree]

    def log1p(x):
        p = jnp.full((), q[-1], x.dtype)
        for c in q[-2::-1]:
            p = p * x + c
        return x + (x * x) * p

    return log1p


def _hard_lean(sign=False, recip="div", exp_rtol=None, q=7):
    """jaxbce's kernel for 16-bit logits and hard labels written differently: ``sign``
    folds the label's sign into the cotangent (``s * where(pos, -dz, dz)`` rather than
    ``where(pos, -s, s) * dz``); ``recip`` is how ``r = 1/(1+e)`` is formed: ``div``
    (division), ``rsq`` (rsqrt squared and a Newton step), ``rsq0`` (rsqrt squared
    alone), ``rexp`` (``exp(-log1p(e))``, sharing the loss's ``log1p``); ``exp_rtol``
    lets XLA use a faster ``exp`` within that relative tolerance; ``q`` is the degree of
    the polynomial in ``log1p`` (:func:`_log1p_q`)."""
    log1p = _log1p_q(q)

    def parts(z, y):
        pos = y != 0
        wrong = pos != (z >= 0)
        e = _exp(ew.neg_abs(z), exp_rtol)
        return pos, wrong, e, log1p(e)

    @jax.custom_jvp
    def hard(z, y):
        _, wrong, _, lg = parts(z, y)
        return jnp.where(wrong, jnp.abs(z), jnp.zeros((), z.dtype)) + lg

    @hard.defjvp
    def _jvp(primals, tangents):
        z, y = primals
        pos, wrong, e, lg = parts(z, y)
        if recip == "div":
            r = 1 / (1 + e)
        elif recip == "rexp":
            r = _exp(-lg, exp_rtol)
        else:
            r = _recip_rsqrt(1 + e, newton=recip == "rsq")
        s = jnp.where(wrong, r, e * r)  # sigmoid(t)
        dz = tangents[0]
        return hard(z, y), (s * jnp.where(pos, -dz, dz) if sign else jnp.where(pos, -s, s) * dz)

    return hard


LEAN = {
    "div": dict(),
    "sign": dict(sign=True),
    "rsq": dict(recip="rsq"),
    "rsq0": dict(recip="rsq0"),
    "rsq0-sign": dict(recip="rsq0", sign=True),
    "rsq0-q6": dict(recip="rsq0", q=6),
    "rsq0-q5": dict(recip="rsq0", q=5),
    "rsq0-q4": dict(recip="rsq0", q=4),
}


# How the forward-only variants sum the loss ("sum": one jnp.sum).
FWD_LAYOUTS = ("sum", "rows-512", "rows-1024", "rows-4096", "rows-16384", "cols-1024")

# How the lean variants sum the loss: rows of R elements or columns of [N / C, C].
LAYOUTS = (
    "rows-256",
    "rows-512",
    "rows-1024",
    "rows-2048",
    "rows-4096",
    "rows-8192",
    "cols-1024",
    "tcols-64",
    "tcols-512",
)


def variants(labels: str = "bool") -> dict:
    """name -> function of (logits, labels); each jitted function is named probe_<name>.

    Float labels get the general kernel, bool/int labels the hard one (as the public
    function chooses), each with XLA's ``log1p`` and with jaxbce's polynomial, each summed
    over rows of several sizes."""

    def current(z, y):
        return jaxbce.binary_cross_entropy_with_logits(z, y)

    out = {"current": jax.value_and_grad(current)}
    hard_labels = labels != "f32"
    names = [f.name for (hard, _), f in _core.FORMULATIONS.items() if hard == hard_labels]
    for name in names:
        kernel = _table_kernel(name)
        for size in ROWS:
            total = _rows_sum(size)

            def f(z, y, total=total, kernel=kernel):
                yy = y if hard_labels else y.astype(jnp.float32)
                return (total(kernel(z.astype(jnp.float32), yy, None)) / z.size).astype(z.dtype)

            out[f"{name}-{size}"] = jax.value_and_grad(f)
    if hard_labels:
        for name, kw in LEAN.items():
            kernel = _hard_lean(**kw)
            for layout in LAYOUTS:
                total = _sum_for(layout)

                def h(z, y, total=total, kernel=kernel):
                    return (total(kernel(z.astype(jnp.float32), y)) / z.size).astype(z.dtype)

                out[f"lean-{name}-{layout}"] = jax.value_and_grad(h)
    kernel = _core.kernel_for(hard_labels, narrow=True)
    out["grad-only"] = jax.grad(
        lambda z, y: (
            jnp.sum(
                kernel(z.astype(jnp.float32), y if hard_labels else y.astype(jnp.float32), None)
            )
            / z.size
        ).astype(z.dtype)
    )
    total = _rows_sum(512)  # the reduction and its side output, almost no math

    def g(z, y):
        zf = z.astype(jnp.float32)
        return (total(zf * zf * y.astype(jnp.float32)) / z.size).astype(z.dtype)

    out["nomath-512"] = jax.value_and_grad(g)
    # Forward only (the loss value): jaxbce, its kernel summed in other ways, and optax.
    out["fwd-current"] = current
    fwd_kernel = _core.kernel_for(hard_labels, _prepare.is_narrow(jnp.bfloat16))
    for layout in FWD_LAYOUTS:
        total = jnp.sum if layout == "sum" else _sum_for(layout)

        def fwd(z, y, total=total):
            yy = y if hard_labels else y.astype(jnp.float32)
            return (total(fwd_kernel(z.astype(jnp.float32), yy, None)) / z.size).astype(z.dtype)

        out[f"fwd-{layout}"] = fwd
    out["fwd-optax"] = functools.partial(impls.optax_loss("none"), aux=None)
    if not hard_labels:  # the CPU loss with the GPU gradient, forward and with grad
        fused = _core.FORMULATIONS[False, False]
        kernel = _core.make_kernel(_core.Formulation("cpuform", _core.CPU.loss, fused.grad))

        def loss_of(z, y, kernel=kernel):
            total = _rows_sum(_reduce.SUM_ROWS_NARROW)
            return (total(kernel(z.astype(jnp.float32), y, None)) / z.size).astype(z.dtype)

        out["fwd-cpuform"] = loss_of
        out["vg-cpuform"] = jax.value_and_grad(loss_of)
    out["copy"] = lambda z, y: z + y.astype(z.dtype)
    for name, fn in out.items():
        out[name] = functools.wraps(fn)(lambda *a, fn=fn: fn(*a))
        out[name].__name__ = "probe_" + name.replace("-", "_")
    return out


def accuracy(n: int = 1 << 20, seed: int = 0) -> dict:
    """Largest error in float32 ulp (normal range) of each kernel's element-wise loss and
    gradient on this device, against float64 (numpy) on the host. Logits log-uniform in
    +-[1e-6, 90]; labels 0/1 for the hard kernel, 0, 1, 0.3 and 0.999 for the general one."""
    rng = np.random.default_rng(seed)
    z = np.exp(rng.uniform(np.log(1e-6), np.log(90.0), n)) * rng.choice([-1.0, 1.0], n)
    z = z.astype(np.float32)
    zd = z.astype(np.float64)

    def softplus(x):
        return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))

    def sigmoid(x):
        return np.where(x >= 0, 1 / (1 + np.exp(-x)), np.exp(x) / (1 + np.exp(x)))

    def ulps(got, true):
        got = np.asarray(got, np.float64)
        ok = np.abs(true) >= np.finfo(np.float32).tiny
        err = np.abs(got - true) / np.spacing(np.abs(true).astype(np.float32)).astype(np.float64)
        return float(err[ok].max())

    out = {}
    for label in (0.0, 1.0, 0.3, 0.999):
        y = np.full(n, label, np.float32)
        yd = y.astype(np.float64)
        loss_true = (1 - yd) * softplus(zd) + yd * softplus(-zd)
        grad_true = (1 - yd) * sigmoid(zd) - yd * sigmoid(-zd)
        kernels = {
            f.name: _without_pw(_core.make_kernel(f))
            for (hard, _), f in _core.FORMULATIONS.items()
            if label in (0.0, 1.0) or not hard
        }
        if label in (0.0, 1.0):
            kernels |= {f"lean-{k}": _hard_lean(**kw) for k, kw in LEAN.items()}
        for name, kernel in kernels.items():
            yy = jnp.asarray(y != 0) if name.startswith(("hard", "lean")) else jnp.asarray(y)
            loss, grad = jax.jit(
                lambda z, y, kernel=kernel: jax.jvp(
                    lambda z: kernel(z, y), (z,), (jnp.ones_like(z),)
                )
            )(jnp.asarray(z), yy)
            scale = (1 - yd) * sigmoid(zd) + yd * sigmoid(-zd)  # the terms' size (soft labels)
            grad_err = np.abs(np.asarray(grad, np.float64) - grad_true) / (
                np.spacing(scale.astype(np.float32)).astype(np.float64)
            )
            grad_err = grad_err[scale >= np.finfo(np.float32).tiny]
            out[f"{name} y={label}"] = {
                "loss_max_ulp": ulps(loss, loss_true),
                "grad_max_ulp_of_terms": float(grad_err.max()),
            }
            print(f"  accuracy {name:10s} y={label}: {out[f'{name} y={label}']}", flush=True)
    return out


def _round_bf16(v: np.ndarray) -> np.ndarray:
    """float64 to bfloat16 bits, correctly rounded (no double rounding through float32)."""
    f = v.astype(np.float32)
    low = (f.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    high = (low.view(np.uint32) + np.uint32(0x10000)).view(np.float32)
    dl, dh = np.abs(v - low.astype(np.float64)), np.abs(high.astype(np.float64) - v)
    even = (low.view(np.uint32) & np.uint32(0x10000)) == 0
    out = np.where((dh < dl) | ((dh == dl) & ~even), high, low)
    return (out.view(np.uint32) >> 16).astype(np.uint16)


def accuracy_16bit(dtype: str = "bf16") -> dict:
    """Every finite 16-bit logit (``bf16`` or ``f16``) with labels 0 and 1: how many
    element-wise losses and gradients, rounded to that dtype as jaxbce returns them,
    differ from the correctly rounded value, and by how many of its ulp at most. Results
    below the dtype's normal range (where XLA:CPU flushes float32 to zero) are counted
    apart."""
    import ml_dtypes

    np_dtype = ml_dtypes.bfloat16 if dtype == "bf16" else np.float16
    round16 = _round_bf16 if dtype == "bf16" else lambda v: v.astype(np.float16).view(np.uint16)
    tiny = float(ml_dtypes.finfo(np_dtype).tiny)
    zb = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np_dtype)
    zb = zb[np.isfinite(zb.astype(np.float32))]
    zd = zb.astype(np.float64)
    out = {}
    kernels = {
        f.name: _without_pw(_core.make_kernel(f))
        for (hard, _), f in _core.FORMULATIONS.items()
        if hard
    } | {f"lean-{k}": _hard_lean(**kw) for k, kw in LEAN.items()}
    for label in (0, 1):
        t = zd if label == 0 else -zd
        with np.errstate(over="ignore", invalid="ignore"):
            loss_true = np.maximum(t, 0) + np.log1p(np.exp(-np.abs(t)))
            sig = np.where(t >= 0, 1 / (1 + np.exp(-t)), np.exp(t) / (1 + np.exp(t)))
        truth = {"loss": loss_true, "grad": sig if label == 0 else -sig}
        y = jnp.full(zb.shape, bool(label))
        for name, kernel in kernels.items():
            loss, grad = jax.jit(
                lambda z, y, kernel=kernel: jax.jvp(
                    lambda z: kernel(z.astype(jnp.float32), y).astype(z.dtype),
                    (z,),
                    (jnp.ones_like(z),),
                )
            )(jnp.asarray(zb), y)
            rec = {"n": int(zb.size)}
            for what, got in (("loss", loss), ("grad", grad)):
                g = np.asarray(got).view(np.uint16).astype(np.int64)
                r = round16(truth[what]).astype(np.int64)
                # sign-magnitude bits onto an ordered integer line: distance in ulp
                d = np.abs(
                    np.where(g & 0x8000, -(g & 0x7FFF), g) - np.where(r & 0x8000, -(r & 0x7FFF), r)
                )
                normal = np.abs(truth[what]) >= tiny
                rec[what] = {
                    "wrong": int((d[normal] > 0).sum()),
                    "max_ulp": int(d[normal].max()),
                    "wrong_subnormal": int((d[~normal] > 0).sum()),
                }
            out[f"{dtype} {name} y={label}"] = rec
            print(f"  {dtype} outputs {name:14s} y={label}: {rec}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log2n", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--out", default="formulations")
    parser.add_argument("--dtypes", default=None, help="e.g. bf16/bool,f32/f32")
    parser.add_argument("--only", default=None, help="regex: the variants to run")
    parser.add_argument("--accuracy", action="store_true", help="ulp errors of the kernels")
    args = parser.parse_args()
    n = 1 << args.log2n
    os.makedirs(args.out, exist_ok=True)
    pairs = bench.ALL_DTYPES
    if args.dtypes:
        pairs = [tuple(s.split("/")) for s in args.dtypes.split(",")]
    meta = {"device": bench.device_name(), **bench.versions(), "n": n}
    print(meta, flush=True)
    results: dict = {"meta": meta, "cases": {}}
    tar_buf = io.BytesIO()
    tar = tarfile.open(fileobj=tar_buf, mode="w:gz")

    peak = jax.jit(lambda x: x + 1.0).lower(jax.ShapeDtypeStruct((n,), jnp.float32)).compile()
    x32 = jnp.ones((n,), jnp.float32) * 0.5
    t = bench.time_interleaved(
        {"peak": (lambda x=x32: peak(x), jax.block_until_ready)},
        repeats=args.repeats,
        in_flight=args.in_flight,
    )
    peak_ms = float(np.median(t["peak"]) * 1e3)
    results["peak_f32_copy"] = {"ms": peak_ms, "bytes_per_s": 8 * n / (peak_ms / 1e3)}
    print(f"peak f32 copy: {peak_ms:.3f} ms, {8 * n / peak_ms / 1e9:.2f} TB/s", flush=True)
    del x32
    if args.accuracy:
        results["accuracy"] = accuracy()
        results["accuracy_16bit"] = accuracy_16bit("bf16") | accuracy_16bit("f16")

    for logits, labels in pairs:
        host = impls.host_inputs(n, logits, labels)
        z, y = jax.device_put(host["z"]), jax.device_put(host["y"])
        runners, info, outs = {}, {}, {}
        for name, fn in variants(labels).items():
            if args.only and name not in ("current", "copy") and not re.search(args.only, name):
                continue
            named = jax.jit(fn).lower(z, y)
            compiled = named.compile()
            text = compiled.as_text()
            data = text.encode()
            ti = tarfile.TarInfo(f"{logits}_{labels}/{name}.hlo.txt")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
            info[name] = hlo.summarize(compiled, n)
            runners[name] = (lambda c=compiled, a=(z, y): c(*a), jax.block_until_ready)
            outs[name] = runners[name][0]()
        ref_loss, ref_grad = outs["current"]
        checks = {}
        for name, o in outs.items():
            if name == "copy":
                continue
            fwd = name.startswith("fwd")
            loss = None if name.endswith("grad-only") else o if fwd else o[0]
            grad = None if fwd else o if name.endswith("grad-only") else o[1]
            c = {}
            if loss is not None and not name.startswith("nomath"):
                c["loss_rel_diff"] = float(abs(float(loss) - float(ref_loss)) / float(ref_loss))
            if grad is not None and not name.startswith("nomath"):
                c["grad_bitwise_equal"] = bool(jnp.array_equal(grad, ref_grad))
                c["grad_max_abs_diff"] = float(
                    jnp.max(jnp.abs(grad.astype(jnp.float32) - ref_grad.astype(jnp.float32)))
                )
            checks[name] = c
        del outs, ref_loss, ref_grad
        t = bench.time_interleaved(runners, repeats=args.repeats, in_flight=args.in_flight)
        copy_ms = float(np.median(t["copy"]) * 1e3)
        case = {}
        per = np.dtype(impls.LOGIT_DTYPES[logits]).itemsize
        per += np.dtype(impls.LABEL_DTYPES[labels]).itemsize
        for name, s in t.items():
            ms = float(np.median(s) * 1e3)
            nbytes = n * (
                per
                + (0 if name.startswith("fwd") else np.dtype(impls.LOGIT_DTYPES[logits]).itemsize)
            )
            case[name] = {
                "ms": ms,
                "ms_p25": float(np.percentile(s, 25) * 1e3),
                "ms_p75": float(np.percentile(s, 75) * 1e3),
                "pct_copy": 100 * copy_ms / ms,
                "pct_peak": 100 * (nbytes / (ms / 1e3)) / results["peak_f32_copy"]["bytes_per_s"],
                "hlo": info[name],
                "check": checks.get(name),
            }
        results["cases"][f"{logits}/{labels}"] = case
        print(f"\n== {logits}/{labels}: copy {copy_ms:.3f} ms", flush=True)
        for name, r in case.items():
            print(
                f"  {name:16s} {r['ms']:7.3f} ms  {r['pct_copy']:5.1f}% copy  "
                f"{r['pct_peak']:5.1f}% peak  fusions={r['hlo']['fusions']} "
                f"temp/elem={r['hlo']['temp_per_element']}  {r['check'] or ''}",
                flush=True,
            )
        del z, y, runners
    tar.close()
    with open(os.path.join(args.out, "hlo.tar.gz"), "wb") as f:
        f.write(tar_buf.getvalue())
    with open(os.path.join(args.out, "formulations.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
