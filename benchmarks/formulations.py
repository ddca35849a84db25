"""Probe: how the mean's reduction is written decides whether the fused loss + gradient
kernel runs at the copy limit. One size, every dtype pair, several formulations side by
side, each checked against jaxbce's own result and its compiled HLO saved.

    python -m benchmarks.formulations --log2n 28 --out DIR      # on a GPU

Formulations (value_and_grad of the mean w.r.t. the logits unless said otherwise):

- ``current``: ``jaxbce.binary_cross_entropy_with_logits`` as shipped.
- ``gen-L-R`` (float labels) and ``hard-L-R`` (bool/int labels): jaxbce's GPU kernel for
  those labels with ``log1p`` from XLA (``L = xla``) or jaxbce's polynomial (``poly``,
  ``_core._log1p_unit``), summed over rows of ``R`` elements, then the row sums.
- ``lean-V-R`` (bool/int labels): the hard kernel with the polynomial and its gradient
  written differently: ``sign`` the label's sign folded into the cotangent, ``rsq``
  ``1/(1+e)`` from ``rsqrt`` and a Newton step, and both.
- ``grad-only``: only the gradient (the loss value discarded, so XLA drops it): the
  element-wise part alone, in a loop fusion. ``nomath-512``: the reduction with the
  gradient as a side output and almost no math.
- ``copy``: the bytes of value_and_grad with no math (read logits and labels, write an
  array of the logits' dtype): the limit. ``peak-f32``: a float32 copy of N elements
  (8 B/element), the device's bandwidth.

``--accuracy`` measures each kernel's ulp error on this device against float64;
``--only REGEX`` restricts the variants. (In ``results/gpu/formulations/run5-*.log``,
``poly`` was a 12-multiply-add polynomial, 1.31 ulp, ``p9`` today's ``poly``, and the
``lean`` variants still had the two-select loss of the hard kernel.)

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
from jaxbce import _common, _core  # noqa: E402

ROWS = (512, 1024, 4096)


def _rows_sum(size: int):
    """jaxbce's two-stage sum (``_common.sum_all``) over rows of ``size`` elements."""
    return functools.partial(_common.sum_all, rows=size)


def _gpu_kernel(loss, grad, log1p):
    """jaxbce's GPU kernel ``loss``/``grad`` (``_core._loss_fused``/``_grad_fused`` for
    float labels, ``_loss_hard``/``_grad_hard`` for bool/int ones) with the given
    ``log1p`` (``jnp.log1p``: XLA's library call; ``_core._log1p_unit``: jaxbce's)."""

    @jax.custom_jvp
    def kernel(z, y):
        return loss(z, y, None, log1p)

    @kernel.defjvp
    def _kernel_jvp(primals, tangents):
        z, y = primals
        return kernel(z, y), grad(z, y, None) * tangents[0]

    return kernel


def _general(log1p):
    return _gpu_kernel(_core._loss_fused, _core._grad_fused, log1p)


def _hard(log1p):
    return _gpu_kernel(_core._loss_hard, _core._grad_hard, log1p)


def _recip_rsqrt(u):
    """1/u for u in [1, 2]: rsqrt(u)**2 (one special-function op) and a Newton step."""
    r0 = jax.lax.rsqrt(u)
    r0 = r0 * r0
    return r0 + r0 * (1 - u * r0)


def _hard_lean(sign=False, rsq=False):
    """jaxbce's kernel for 16-bit logits and hard labels with its gradient written
    differently: ``sign`` folds the label's sign into the cotangent (``s * where(pos,
    -dz, dz)`` rather than ``where(pos, -s, s) * dz``); ``rsq`` takes ``1/(1+e)`` from
    rsqrt and a Newton step."""

    @jax.custom_jvp
    def hard(z, y):
        return _core._loss_hard(z, y, None, _core._log1p_unit)

    @hard.defjvp
    def _jvp(primals, tangents):
        z, y = primals
        pos, wrong, e, r = _core._hard_parts(z, y)
        if rsq:
            r = _recip_rsqrt(1 + e)
        s = jnp.where(wrong, r, e * r)  # sigmoid(t)
        dz = tangents[0]
        return hard(z, y), (s * jnp.where(pos, -dz, dz) if sign else jnp.where(pos, -s, s) * dz)

    return hard


LEAN = {"sign": dict(sign=True), "rsq": dict(rsq=True), "sign-rsq": dict(sign=True, rsq=True)}


LOG1P = {"xla": jnp.log1p, "poly": _core._log1p_unit}


def variants(labels: str = "bool") -> dict:
    """name -> function of (logits, labels); each jitted function is named probe_<name>.

    Float labels get the general kernel, bool/int labels the hard one (as the public
    function chooses), each with XLA's ``log1p`` and with jaxbce's polynomial, each summed
    over rows of several sizes."""

    def current(z, y):
        return jaxbce.binary_cross_entropy_with_logits(z, y)

    out = {"current": jax.value_and_grad(current)}
    hard_labels = labels != "f32"
    kind = "hard" if hard_labels else "gen"
    for name, log1p in LOG1P.items():
        kernel = (_hard if hard_labels else _general)(log1p)
        for size in ROWS:
            total = _rows_sum(size)

            def f(z, y, total=total, kernel=kernel):
                yy = y if hard_labels else y.astype(jnp.float32)
                return (total(kernel(z.astype(jnp.float32), yy)) / z.size).astype(z.dtype)

            out[f"{kind}-{name}-{size}"] = jax.value_and_grad(f)
    if hard_labels:
        for name, kw in LEAN.items():
            kernel = _hard_lean(**kw)
            for size in (512, 4096):
                total = _rows_sum(size)

                def h(z, y, total=total, kernel=kernel):
                    return (total(kernel(z.astype(jnp.float32), y)) / z.size).astype(z.dtype)

                out[f"lean-{name}-{size}"] = jax.value_and_grad(h)
    kernel = (_hard if hard_labels else _general)(LOG1P["poly"])
    out["grad-only"] = jax.grad(
        lambda z, y: (
            jnp.sum(kernel(z.astype(jnp.float32), y if hard_labels else y.astype(jnp.float32)))
            / z.size
        ).astype(z.dtype)
    )
    total = _rows_sum(512)  # the reduction and its side output, almost no math

    def g(z, y):
        zf = z.astype(jnp.float32)
        return (total(zf * zf * y.astype(jnp.float32)) / z.size).astype(z.dtype)

    out["nomath-512"] = jax.value_and_grad(g)
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
        kernels = {f"gen-{k}": _general(f) for k, f in LOG1P.items()}
        if label in (0.0, 1.0):
            kernels |= {f"hard-{k}": _hard(f) for k, f in LOG1P.items()}
            kernels |= {f"lean-{k}": _hard_lean(**kw) for k, kw in LEAN.items()}
        for name, kernel in kernels.items():
            yy = jnp.asarray(y != 0) if name.startswith("hard") else jnp.asarray(y)
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
            loss = None if name.endswith("grad-only") else o[0]
            grad = o if name.endswith("grad-only") else o[1]
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
                per + (0 if name == "fwd" else np.dtype(impls.LOGIT_DTYPES[logits]).itemsize)
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
