"""The fused linear + sigmoid BCE at scale: ``linear_binary_cross_entropy`` against jaxbce
on the materialized ``[B, C]`` logits, a chunked scan differentiated by autodiff, and the
three plain matmuls every implementation needs.

    python -m benchmarks.linear --quick      # CPU: B=512, H=256, C=65536, f32 (~2 min)
    python -m benchmarks.linear --gpu        # one GPU: B=4096, H=768, C=2^20 and 2^17, bf16

Times the jitted ``value_and_grad`` w.r.t. ``(x, w, bias)`` of the mean loss with
``K = 8`` positive indices per row:

* *fused*: ``linear_binary_cross_entropy`` (the default chunk; ``fused[n]``: chunk n);
* *materialized*: ``sparse_binary_cross_entropy_with_logits`` on ``x @ w + bias``
  (float32 logits);
* *chunked-autodiff*: a scan over the same class blocks, each block's loss under
  ``jax.checkpoint`` and differentiated by JAX (the backward pass forms the logits again:
  four matmuls);
* *matmuls*: ``x @ w``, ``dz @ w.T`` and ``x.T @ dz`` in the inputs' dtype.

Functions are compiled once, warmed up and sampled round-robin
(``bench.time_interleaved``); ratios are medians of per-round ratios, with quartiles.
Temporaries are XLA's (``compiled.memory_analysis()``); a function that does not fit is
only compiled. Each fused result is checked against the materialized loss, or, where
that does not fit, against chunked-autodiff. Writes ``results.json`` and ``results.md``
to ``--out`` (default ``benchmarks/results/<backend>/linear``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxbce
from benchmarks import bench, scale
from benchmarks.scale import errors, finish, gb, metadata, progress, ratio_text, ratios, temp_bytes
from jaxbce import _chunked

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "cases": [
            {"B": 512, "H": 256, "C": 65536, "K": 8, "dtype": "float32", "chunks": [None]},
        ],
        "repeats": 15,
    },
    "gpu": {
        "cases": [
            {
                "B": 4096,
                "H": 768,
                "C": 1 << 20,
                "K": 8,
                "dtype": "bfloat16",
                "chunks": [None, 2048, 8192],
                "materialize": False,
            },  # fmt: skip
            {
                "B": 4096,
                "H": 768,
                "C": 1 << 17,
                "K": 8,
                "dtype": "bfloat16",
                "chunks": [None, 2048],
            },  # fmt: skip
        ],
        "repeats": 10,
    },
}
# Largest error over the largest reference value (loss, dx, dw, dbias); bfloat16 inputs
# round p - y to 8 bits for the two backward matmuls.
TOLERANCE = {"float32": (1e-5,) * 4, "bfloat16": (1e-4, 3e-2, 3e-2, 3e-2)}
TARGETS = {"cpu_matmul_ratio": 1.35, "gpu_matmul_ratio": 1.5, "gpu_temp_bytes": 1e9}
TARGETS |= {"gpu_speedup": 1.5, "gpu_temp_ratio": 20.0}


# --------------------------------------------------------------------- the contenders


def fused_fn(idx: jax.Array, chunk: int | None):
    def loss(x, w, b):
        return jaxbce.linear_binary_cross_entropy(
            x, w, positive_indices=idx, bias=b, chunk_size=chunk
        )

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def materialized_fn(idx: jax.Array):
    def loss(x, w, b):
        z = jnp.matmul(x, w, preferred_element_type=jnp.float32) + b.astype(jnp.float32)
        return jaxbce.sparse_binary_cross_entropy_with_logits(z, idx)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def chunked_autodiff_fn(idx: jax.Array, chunk: int):
    """The plain way: a scan over class blocks whose bodies JAX differentiates and
    recomputes (``jax.checkpoint``); ``C`` must be a multiple of ``chunk``."""

    def loss(x, w, b):
        batch, classes = x.shape[0], w.shape[1]
        rows = jnp.arange(batch)[:, None]

        @jax.checkpoint
        def block(x, w_blk, b_blk, start):
            z = jnp.matmul(x, w_blk, preferred_element_type=jnp.float32) + b_blk.astype(jnp.float32)
            local = jnp.where((idx >= start) & (idx < start + chunk), idx - start, chunk)
            y = jnp.zeros((batch, chunk), bool).at[rows, local].set(True, mode="drop")
            return jaxbce.binary_cross_entropy_with_logits(z, y, reduction="sum")

        def step(total, i):
            start = i * chunk
            w_blk = jax.lax.dynamic_slice_in_dim(w, start, chunk, axis=1)
            b_blk = jax.lax.dynamic_slice_in_dim(b, start, chunk)[None, :]
            return total + block(x, w_blk, b_blk, start), None

        starts = jnp.arange(classes // chunk, dtype=jnp.int32)
        return jax.lax.scan(step, jnp.float32(0), starts)[0] / (batch * classes)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def matmuls_fn():
    def three(x, w, b, dz):
        return x @ w, dz @ w.T, x.T @ dz

    return jax.jit(three)


# -------------------------------------------------------------------------- inputs


def device_inputs(case: dict[str, Any]) -> tuple:
    """``x``, ``w``, ``bias`` in the case's dtype, ``[B, K]`` distinct positive indices
    and a ``[B, C]`` stand-in for ``dz`` (for the matmuls), made on the device."""
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(0), 5)
    b, h, c, dt = case["B"], case["H"], case["C"], jnp.dtype(case["dtype"])
    x = jax.random.normal(k1, (b, h), jnp.float32).astype(dt)
    w = (jax.random.normal(k2, (h, c), jnp.float32) / np.sqrt(h)).astype(dt)
    bias = (jax.random.normal(k3, (c,), jnp.float32) - 4.0).astype(dt)
    idx = jax.random.randint(k4, (b, case["K"]), 0, c, jnp.int32)
    dz = (jax.random.uniform(k5, (b, c), jnp.float32) * 1e-6).astype(dt)
    return x, w, bias, idx, dz


# ------------------------------------------------------------------------ measuring


def run_case(case: dict[str, Any], repeats: int) -> dict[str, Any]:
    x, w, bias, idx, dz = device_inputs(case)
    args = (x, w, bias)
    default = _chunked.chunk_size(case["B"], case["C"])
    fns = {f"fused[{c or 'default'}]": fused_fn(idx, c) for c in case["chunks"]}
    fns["chunked-autodiff"] = chunked_autodiff_fn(idx, default)
    materialize = case.get("materialize", True)
    mat = materialized_fn(idx)
    temps = {name: temp_bytes(fn, *args) for name, fn in fns.items()}
    temps["materialized"] = temp_bytes(mat, *args)  # compiled only where it cannot run
    if materialize:
        fns["materialized"] = mat
    matmuls = matmuls_fn()
    temps["matmuls"] = temp_bytes(matmuls, *args, dz)
    _progress(f"{case}: temporaries {temps}")

    reference = "materialized" if materialize else "chunked-autodiff"
    want = jax.block_until_ready(fns[reference](*args))
    verified = {}
    for name, fn in fns.items():
        if name != reference:
            err = errors(fn(*args), want)
            verified[name] = {"vs": reference, "errors": err}
            verified[name]["ok"] = all(np.less(err, TOLERANCE[case["dtype"]]))
    del want

    runners = {name: (lambda fn=fn: fn(*args), jax.block_until_ready) for name, fn in fns.items()}
    runners["matmuls"] = (lambda: matmuls(*args, dz), jax.block_until_ready)
    _progress(f"time {len(runners)} functions x {repeats} rounds")
    samples = bench.time_interleaved(runners, repeats=repeats, in_flight=1)
    records = []
    for name, s in samples.items():
        rec = {
            "impl": name,
            "ms": float(np.median(s) * 1e3),
            "ms_p25": float(np.percentile(s, 25) * 1e3),
            "ms_p75": float(np.percentile(s, 75) * 1e3),
            "samples": len(s),
            "time_vs_matmuls": ratios(s, samples["matmuls"]),
            "temp_bytes": temps[name],
            "verified": verified.get(name, {}),
        }
        if materialize:
            rec["speedup_vs_materialized"] = ratios(samples["materialized"], s)
        records.append(rec)
    return {
        **{k: v for k, v in case.items() if k != "chunks"},
        "default_chunk": default,
        "materialized_temp_bytes": temps["materialized"],
        "records": records,
    }


def targets(run: dict[str, Any]) -> list[tuple[str, str, str]]:
    gpu = run["meta"]["backend"] == "gpu"
    rows = []

    def add(label: str, value: float, goal: float, higher: bool, text: str) -> None:
        met = value >= goal if higher else value <= goal
        rows.append((label, text, "yes" if met else "NO"))

    for case in run["cases"]:
        rec = {r["impl"]: r for r in case["records"]}
        fused = rec["fused[default]"]
        where = f"C = {case['C']}"
        if not gpu:
            goal = TARGETS["cpu_matmul_ratio"]
            ratio = fused["time_vs_matmuls"]
            add(f"CPU: <= {goal}x the matmuls ({where})", ratio["median"], goal, False,
                ratio_text(ratio))  # fmt: skip
            continue
        if "materialized" not in rec:
            goal = TARGETS["gpu_temp_bytes"]
            add(f"GPU: <= 1 GB temporaries ({where})", fused["temp_bytes"], goal, False,
                gb(fused["temp_bytes"]))  # fmt: skip
            goal = TARGETS["gpu_matmul_ratio"]
            ratio = fused["time_vs_matmuls"]
            add(f"GPU: <= {goal}x the matmuls ({where})", ratio["median"], goal, False,
                ratio_text(ratio))  # fmt: skip
        else:
            goal = TARGETS["gpu_speedup"]
            ratio = fused["speedup_vs_materialized"]
            add(f"GPU: >= {goal}x faster than materialized ({where})", ratio["median"], goal,
                True, ratio_text(ratio))  # fmt: skip
            goal = TARGETS["gpu_temp_ratio"]
            less = case["materialized_temp_bytes"] / max(fused["temp_bytes"], 1)
            add(f"GPU: >= {goal:g}x less temporary memory ({where})", less, goal, True,
                f"{less:.1f}x")  # fmt: skip
    return rows


# ------------------------------------------------------------------------- reporting


def markdown(run: dict[str, Any]) -> str:
    m = run["meta"]
    lines = [
        f"# linear_binary_cross_entropy benchmark: {m['device']}",
        "",
        f"{m['date']}, jax {m['jax']}, jaxlib {m['jaxlib']}, load average "
        f"{m['load_before']} before / {m['load_after']} after, {m['seconds']:.0f} s. "
        f"Command: `{m['command']}`",
        "",
        "value_and_grad w.r.t. (x, w, bias) of the mean loss with K positive indices per "
        f"row; median of {run['repeats']} interleaved rounds. Ratios: medians of per-round "
        "ratios (quartiles in brackets). *materialized*: `sparse_binary_cross_entropy_"
        "with_logits` on `x @ w + bias` (float32 logits); *chunked-autodiff*: a scan over "
        "the same blocks, `jax.checkpoint` and autodiff; *matmuls*: `x @ w`, `dz @ w.T`, "
        "`x.T @ dz` in the inputs' dtype. *temp*: XLA's temporaries (`memory_analysis`).",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in targets(run)),
    ]
    for case in run["cases"]:
        materialize = "materialized" in {r["impl"] for r in case["records"]}
        lines += [
            "",
            f"## B = {case['B']}, H = {case['H']}, C = {case['C']}, K = {case['K']}, "
            f"{case['dtype']} (default chunk {case['default_chunk']})",
            "",
        ]
        if not materialize:
            lines += [
                "The materialized loss is not run at this size; compiled, it needs "
                f"{gb(case['materialized_temp_bytes'])} of temporaries.",
                "",
            ]
        lines += [
            "| impl | ms | ms p25-p75 | x the matmuls' time | x faster than materialized "
            "| temp | verified (max rel. err.: loss, dx, dw, dbias) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in case["records"]:
            v = r["verified"]
            check = "-"
            if v:
                errs = ", ".join(f"{e:.1e}" for e in v["errors"])
                check = f"{'yes' if v['ok'] else 'NO'} vs {v['vs']}: {errs}"
            speed = ratio_text(r["speedup_vs_materialized"]) if materialize else "-"
            lines.append(
                f"| {r['impl']} | {r['ms']:.2f} | {r['ms_p25']:.2f}-{r['ms_p75']:.2f} "
                f"| {ratio_text(r['time_vs_matmuls'])} | {speed} | {gb(r['temp_bytes'])} "
                f"| {check} |"
            )
    return "\n".join(lines) + "\n"


def _progress(msg: str) -> None:
    progress("linear", msg)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = scale.parser(__doc__, "CPU, C=65536 f32 (default)", "one GPU, C=2^20 and 2^17 bf16")
    args = parser.parse_args(argv)
    name = "gpu" if args.gpu else "quick"
    meta = metadata("benchmarks.linear", argv)
    if name == "gpu" and meta["backend"] != "gpu":
        parser.error(f"--gpu needs a GPU; JAX's default backend here is {meta['backend']!r}")
    out = args.out or os.path.join("benchmarks", "results", meta["backend"], "linear")
    repeats = args.repeats or PRESETS[name]["repeats"]
    _progress(f"{meta['device']}, jax {meta['jax']}, preset {name}, out {out}")
    run: dict[str, Any] = {"meta": meta, "preset": name, "repeats": repeats}
    run["cases"] = [run_case(case, repeats) for case in PRESETS[name]["cases"]]
    finish(out, run, markdown)
    failed = [
        r["impl"] for c in run["cases"] for r in c["records"] if r["verified"].get("ok") is False
    ]
    scale.exit_if_wrong("linear", failed)
    return run


if __name__ == "__main__":
    main()
