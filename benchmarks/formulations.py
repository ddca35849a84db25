"""Probe: how the mean's reduction is written decides whether the fused loss + gradient
kernel runs at the copy limit. One size, every dtype pair, several formulations side by
side, each checked against jaxbce's own result and its compiled HLO saved.

    python -m benchmarks.formulations --log2n 28 --out DIR      # on a GPU

Formulations (value_and_grad of the mean w.r.t. the logits unless said otherwise):

- ``current``: ``jaxbce.binary_cross_entropy_with_logits`` as shipped.
- ``rowsR``: jaxbce's element-wise kernel summed in two stages (``_two_stage_sum``):
  the flattened ``[N]`` viewed as ``[N / R, R]``, rows summed first, then the row sums.
  ``colsC``: the same over ``[N / C, C]``, columns first.
- ``grad-only``: only the gradient (the loss value discarded, so XLA drops it): the
  element-wise part alone, in a loop fusion.
- ``copy``: the bytes of value_and_grad with no math (read logits and labels, write an
  array of the logits' dtype): the limit. ``peak-f32``: a float32 copy of N elements
  (8 B/element), the device's bandwidth.

Writes ``formulations.json`` and ``hlo.tar.gz`` (every variant's optimized HLO) to
``--out``; the XLA dump (PTX) goes wherever ``XLA_FLAGS=--xla_dump_to`` says.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import tarfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxbce  # noqa: E402
from benchmarks import bench, hlo, impls  # noqa: E402
from jaxbce import _core  # noqa: E402

ROWS = (512, 1024, 2048, 4096, 8192)
COLS = (256, 1024, 4096)


def _two_stage_sum(split: str, size: int):
    """``sum(x)`` over every element, in two reductions that XLA may not merge: over
    ``[N / size, size]`` rows (``split="rows"``) or columns (``"cols"``) first, an
    optimization barrier on the partial sums, then their sum. A custom_jvp whose tangent
    is the plain sum keeps the barrier out of the derivatives (the cotangent of the sum
    is a scalar broadcast that fuses into the gradient)."""

    @jax.custom_jvp
    def total(x):
        part = jnp.sum(x.reshape(-1, size), axis=1 if split == "rows" else 0)
        return jnp.sum(jax.lax.optimization_barrier(part))

    @total.defjvp
    def _total_jvp(primals, tangents):
        return total(primals[0]), jnp.sum(tangents[0])

    return total


def _elementwise(z: jax.Array, y: jax.Array) -> jax.Array:
    """jaxbce's element-wise kernel in float32, as the public function calls it."""
    return _core.bce_with_logits(z.astype(jnp.float32), y.astype(jnp.float32), None)


def _hard_parts(z: jax.Array, pos: jax.Array):
    """For hard labels: ``t`` (the loss is softplus(t)), ``e = exp(-|z|)``, ``r = 1/(1+e)``."""
    t = jnp.where(pos, -z, z)
    e = jnp.exp(jnp.where(z >= 0, -z, z))
    return t, e, 1 / (1 + e)


def _hard_loss(z, pos, log1p="log1p"):
    t, e, r = _hard_parts(z, pos)
    if log1p == "log1p":
        lg = jnp.log1p(e)
    else:  # log(u) corrected by the rounding error of u = 1 + e, sharing r = 1/u
        u = 1 + e
        lg = jnp.log(u) + (e - (u - 1)) * r
    return jnp.maximum(t, 0) + lg


def _hard_grad(z, pos):
    t, e, r = _hard_parts(z, pos)
    s = jnp.where(t >= 0, r, e * r)  # sigmoid(t)
    return jnp.where(pos, -s, s)


def _make_hard(log1p: str):
    @jax.custom_jvp
    def hard(z, pos):
        return _hard_loss(z, pos, log1p)

    @hard.defjvp
    def _hard_jvp(primals, tangents):
        z, pos = primals
        return hard(z, pos), _hard_grad(z, pos) * tangents[0]

    return hard


def variants() -> dict:
    """name -> function of (logits, labels); each jitted function is named probe_<name>."""

    def current(z, y):
        return jaxbce.binary_cross_entropy_with_logits(z, y)

    out = {"current": jax.value_and_grad(current)}
    general512 = _two_stage_sum("rows", 512)
    out["rows512"] = jax.value_and_grad(
        lambda z, y: (general512(_elementwise(z, y)) / z.size).astype(z.dtype)
    )
    for log1p in ("log1p", "logcorr"):
        hard = _make_hard(log1p)
        for size in (None, 512, 1024, 4096):
            total = jnp.sum if size is None else _two_stage_sum("rows", size)

            def f(z, y, total=total, hard=hard):
                return (total(hard(z.astype(jnp.float32), y != 0)) / z.size).astype(z.dtype)

            out[f"hard-{log1p}-{size or 'one'}"] = jax.value_and_grad(f)
    hard = _make_hard("log1p")
    out["hard-grad-only"] = jax.grad(
        lambda z, y: (jnp.sum(hard(z.astype(jnp.float32), y != 0)) / z.size).astype(z.dtype)
    )
    for size in (None, 1024):  # the reduction and its side output with almost no math
        total = jnp.sum if size is None else _two_stage_sum("rows", size)

        def g(z, y, total=total):
            zf = z.astype(jnp.float32)
            return (total(zf * zf * y.astype(jnp.float32)) / z.size).astype(z.dtype)

        out[f"nomath-{size or 'one'}"] = jax.value_and_grad(g)
    out["copy"] = lambda z, y: z + y.astype(z.dtype)
    for name, fn in out.items():
        out[name] = functools.wraps(fn)(lambda *a, fn=fn: fn(*a))
        out[name].__name__ = "probe_" + name.replace("-", "_")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log2n", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--out", default="formulations")
    parser.add_argument("--dtypes", default=None, help="e.g. bf16/bool,f32/f32")
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

    for logits, labels in pairs:
        host = impls.host_inputs(n, logits, labels)
        z, y = jax.device_put(host["z"]), jax.device_put(host["y"])
        runners, info, outs = {}, {}, {}
        for name, fn in variants().items():
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
