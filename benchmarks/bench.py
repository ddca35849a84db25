"""Benchmark suite: jaxbce against optax, sigmoid-then-log and PyTorch, and against a
copy of the same bytes (the memory-bandwidth limit of a memory-bound loss).

    python -m benchmarks.bench --quick              # CPU: a few minutes
    python -m benchmarks.bench --gpu --out DIR      # one GPU: 2^16 .. 2^28 elements
    python -m benchmarks.bench --sparse-only        # only the sparse targets
    python -m benchmarks.bench --gpu --check        # the guard: exits 1 below a target

Times the jitted ``value_and_grad`` of the mean loss w.r.t. the logits ("vg") and the
loss alone ("fwd"), for logits {f32, bf16} x labels {f32, bool, int8}, with and without
``pos_weight`` / ``weight`` / ``where``, and a whole jitted train step of the multi-label
example; and sparse positive-index targets (``sparse_binary_cross_entropy_with_logits``)
against the same labels given dense (f32, bool), with a copy of the sparse loss's bytes.
Every function is compiled once ahead of time and warmed up; the implementations of one
case are timed interleaved (round-robin, so that load on the machine hits them alike),
each sample with ``--in-flight`` calls dispatched before blocking; the median is
reported. Every result is checked against a float64 reference.
Writes ``results.json``, ``results.md`` and ``throughput.png`` to ``--out``.
"""

from __future__ import annotations

import os

# The caller's settings that change timings, recorded before this module sets its own.
USER_ENV = {
    k: v
    for k, v in sorted(os.environ.items())
    if k.startswith(("MALLOC_", "XLA_", "JAX_", "OMP_", "MKL_", "CUDA_VISIBLE"))
}
# PyTorch shares the GPU in the same process: let JAX allocate on demand instead of
# taking 75% of the memory up front. Must be set before JAX initializes its backend.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import hlo, impls, report  # noqa: E402
from benchmarks.impls import Case  # noqa: E402

ALL_DTYPES = [(z, y) for z in impls.LOGIT_DTYPES for y in impls.LABEL_DTYPES]

PRESETS: dict[str, dict[str, Any]] = {
    # CPU, a few minutes: the table at 2^22, the sweep up to it.
    "quick": {
        "sweep": [16, 18, 20, 22],
        "table": 22,
        "table_options": {("f32", "f32"): impls.OPTIONS, ("bf16", "bool"): impls.OPTIONS},
        "fwd_options": impls.OPTIONS,
        "sparse": [(22, 65536, 32), (22, 4096, 32)],
        "repeats": 25,
        "in_flight": 1,
        "pause_ms": 5,
    },
    # CPU, longer: every option for every dtype pair, sweep to 2^24.
    "full": {
        "sweep": [16, 18, 20, 22, 24],
        "table": 24,
        "table_options": {d: impls.OPTIONS for d in ALL_DTYPES},
        "fwd_options": impls.OPTIONS,
        "sparse": [(22, 65536, 32), (22, 4096, 32), (24, 65536, 32), (24, 1 << 20, 32)],
        "repeats": 25,
        "in_flight": 1,
        "pause_ms": 5,
    },
    # One GPU: the targets are stated at 2^28 elements. Forward-only without options.
    "gpu": {
        "sweep": [16, 18, 20, 22, 24, 26, 28],
        "table": 28,
        "table_options": {d: impls.OPTIONS for d in ALL_DTYPES},
        "fwd_options": ("none",),
        # The sparse target is stated at 2^28 with C = 65536; 2^24 and 2^26 for the trend.
        "sparse": [
            (24, 65536, 32),
            (26, 65536, 32),
            (28, 65536, 32),
            (28, 4096, 32),
            (28, 1 << 20, 32),
        ],
        "repeats": 30,
        "in_flight": 8,
        "pause_ms": 0,
    },
}


def device_name() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
        except (OSError, StopIteration):
            pass
        return f"CPU ({cpu}, {os.cpu_count()} cores)"
    return f"{d.platform.upper()} ({d.device_kind})"


def versions() -> dict[str, str]:
    import jaxlib
    import optax

    out = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "optax": optax.__version__}
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        out["torch"] = "not installed"
    return out


# --------------------------------------------------------------------------- timing


def time_interleaved(
    runners: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]],
    *,
    repeats: int,
    in_flight: int,
    pause: float = 0.0,
) -> dict[str, np.ndarray]:
    """Seconds per call of each runner (``(call, wait)``), sampled round-robin.

    Each sample dispatches ``in_flight`` calls, then waits for all of them; the starting
    runner rotates every round so that none is always first after another. ``pause``
    seconds of sleep before each sample let the previous runner's worker threads go
    idle (PyTorch's OpenMP threads spin for a while after each call, stealing the cores
    from whatever runs next).
    """
    for call, wait in runners.values():
        for _ in range(2):
            wait([call() for _ in range(in_flight)])
    names = list(runners)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            call, wait = runners[name]
            if pause:
                time.sleep(pause)
            t0 = time.perf_counter()
            wait([call() for _ in range(in_flight)])
            times[name].append((time.perf_counter() - t0) / in_flight)
    return {k: np.asarray(v) for k, v in times.items()}


def torch_wait(device: str) -> Callable[[Any], None]:
    import torch

    def wait(_):
        if device == "cuda":
            torch.cuda.synchronize()

    return wait


# ---------------------------------------------------------------------------- cases


@functools.lru_cache(maxsize=1)
def _device_inputs(n: int, logits: str, labels: str) -> dict[str, jax.Array]:
    """The case's inputs on the device, shared by every option and mode."""
    return {k: jax.device_put(v) for k, v in impls.host_inputs(n, logits, labels).items()}


def timing_stats(s: np.ndarray, n: int, nbytes: int) -> dict[str, Any]:
    """Median, spread and throughput of one implementation's samples (seconds)."""
    ms = float(np.median(s) * 1e3)
    return {
        "n": n,
        "ms": ms,
        "ms_min": float(s.min() * 1e3),
        "ms_p25": float(np.percentile(s, 25) * 1e3),
        "ms_p75": float(np.percentile(s, 75) * 1e3),
        "samples": len(s),
        "elem_per_s": n / (ms / 1e3),
        "bytes_per_s": nbytes / (ms / 1e3),
        "bytes": nbytes,
    }


def run_case(
    case: Case,
    names: Sequence[str],
    *,
    repeats: int,
    in_flight: int,
    torch_device: str | None,
    pause: float = 0.0,
    dump_hlo: str | None = None,
) -> tuple[list[dict], dict | None]:
    """Times ``names`` (and the copy) on one case; returns records and jaxbce's HLO summary."""
    host = impls.host_inputs(case.n, case.logits, case.labels)
    dev = _device_inputs(case.n, case.logits, case.labels)
    args = (dev["z"], dev["y"], None if case.option == "none" else dev[case.option])
    runners: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]] = {}
    summary = None
    for name in [*names, "copy"]:
        if name == "torch":
            if torch_device is None:
                continue
            runners[name] = (impls.torch_runner(case, host, torch_device), torch_wait(torch_device))
            continue
        compiled = impls.compile_jax(name, case, args)
        runners[name] = (lambda c=compiled: c(*args), jax.block_until_ready)
        if name == "jaxbce" and case.mode == "vg":
            summary = hlo.summarize(compiled, case.n)
            if dump_hlo:
                os.makedirs(dump_hlo, exist_ok=True)
                fname = f"jaxbce_{case.label.replace('/', '_').replace(' +', '_')}.hlo.txt"
                with open(os.path.join(dump_hlo, fname), "w") as f:
                    f.write(compiled.as_text())
    checks = {}
    for name, (call, wait) in runners.items():
        out = call()
        wait([out])
        if name != "copy":
            checks[name] = impls.verify(case, out)
        del out
    # PyTorch on the CPU perturbs whatever runs next (its threads keep spinning after a
    # call), so it is timed in a block of its own there, after the JAX functions.
    alone = {k: runners.pop(k) for k in list(runners) if k == "torch" and torch_device == "cpu"}
    t = time_interleaved(runners, repeats=repeats, in_flight=in_flight, pause=pause)
    for name, runner in alone.items():
        t |= time_interleaved({name: runner}, repeats=repeats, in_flight=in_flight, pause=pause)
    nbytes = case.bytes_moved()
    records = []
    for name, s in t.items():
        rec = {
            "case": case.label,
            "dtypes": case.dtypes,
            "option": case.option,
            "mode": case.mode,
            "impl": name,
            **timing_stats(s, case.n, nbytes),
        }
        if name != "copy":
            rec["pct_copy"] = 100 * float(np.median(t["copy"])) / float(np.median(s))
            rec["verify"] = checks[name]
        if "optax" in t and name != "copy":
            rec["x_optax"] = float(np.median(t["optax"]) / np.median(s))
            rec["x_optax_paired"] = float(np.median(t["optax"] / s))
            rec["interleaved"] = name not in alone
        records.append(rec)
    return records, summary


def run_sparse_case(
    case: impls.SparseCase,
    *,
    repeats: int,
    in_flight: int,
    pause: float = 0.0,
    dump_hlo: str | None = None,
) -> list[dict]:
    """Times the sparse loss, the dense losses on the same labels and the copies."""
    dev = {
        k: jax.device_put(v)
        for k, v in impls.sparse_host_inputs(case.n, case.classes, case.k).items()
    }
    runners: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]] = {}
    summaries, checks = {}, {}
    for name in [*impls.SPARSE_IMPLS, *impls.SPARSE_COPIES]:
        args = (dev["z"], dev[impls.SPARSE_INPUTS[name]])
        compiled = impls.compile_sparse(name, args)
        runners[name] = (lambda c=compiled, a=args: c(*a), jax.block_until_ready)
        summaries[name] = hlo.summarize(compiled, case.n)
        if dump_hlo and name == "sparse":
            os.makedirs(dump_hlo, exist_ok=True)
            fname = f"sparse_{case.batch}x{case.classes}_k{case.k}.hlo.txt"
            with open(os.path.join(dump_hlo, fname), "w") as f:
                f.write(compiled.as_text())
        out = runners[name][0]()
        jax.block_until_ready(out)
        if name not in impls.SPARSE_COPIES:
            checks[name] = impls.verify_sparse(case, out)
        del out
    t = time_interleaved(runners, repeats=repeats, in_flight=in_flight, pause=pause)
    del dev, runners
    records = []
    for name, s in t.items():
        rec = {
            "case": case.label,
            "batch": case.batch,
            "classes": case.classes,
            "k": case.k,
            "impl": name,
            **timing_stats(s, case.n, case.bytes_moved(name)),
            "x_dense_f32": float(np.median(t["dense-f32"]) / np.median(s)),
            "x_dense_f32_paired": float(np.median(t["dense-f32"] / s)),
            "temp_per_element": summaries[name]["temp_per_element"],
        }
        if name not in impls.SPARSE_COPIES:
            copy = impls.SPARSE_COPY_OF[name]
            rec["copy"] = copy
            rec["pct_copy"] = 100 * float(np.median(t[copy])) / float(np.median(s))
            rec["verify"] = checks[name]
            rec["hlo"] = summaries[name]
        records.append(rec)
    return records


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="CPU, a few minutes (default)")
    preset.add_argument("--full", action="store_true", help="CPU, every option and dtype")
    preset.add_argument("--gpu", action="store_true", help="one GPU, up to 2^28 elements")
    parser.add_argument("--out", default=None, help="output directory")
    parser.add_argument("--sweep", default=None, help="log2 sizes, e.g. 16,20,24")
    parser.add_argument("--table", type=int, default=None, help="log2 size of the tables")
    parser.add_argument("--repeats", type=int, default=None, help="samples per function")
    parser.add_argument("--in-flight", type=int, default=None, help="calls per sample")
    parser.add_argument("--impls", default="jaxbce,optax,sigmoid-log,torch", help="compared")
    parser.add_argument("--pause-ms", type=float, default=None, help="sleep before a sample")
    parser.add_argument("--no-sweep", action="store_true", help="only the tables")
    parser.add_argument("--no-train-step", action="store_true", help="skip the train step")
    parser.add_argument("--dump-hlo", action="store_true", help="write jaxbce's compiled HLO")
    parser.add_argument("--no-sparse", action="store_true", help="skip the sparse targets")
    parser.add_argument(
        "--sparse-only", action="store_true", help="only the sparse targets (no sweep/tables)"
    )
    parser.add_argument(
        "--sparse", default=None, help="sparse shapes log2(B*C):C:K, e.g. 22:65536:32,28:4096:32"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="the guard: only the tables (no sweep, sparse or train step), then exit 1 "
        "if a target is missed or a compiled loss holds N-sized temporaries",
    )
    args = parser.parse_args(argv)
    if args.check:
        args.no_sweep = args.no_train_step = args.no_sparse = True

    name = "gpu" if args.gpu else "full" if args.full else "quick"
    cfg = dict(PRESETS[name])
    backend = jax.default_backend()
    if name == "gpu" and backend != "gpu":
        parser.error(f"--gpu needs a GPU; JAX's default backend here is {backend!r}")
    sweep = [int(s) for s in args.sweep.split(",")] if args.sweep else cfg["sweep"]
    table_n = 1 << (args.table if args.table is not None else cfg["table"])
    repeats = args.repeats or cfg["repeats"]
    in_flight = args.in_flight or cfg["in_flight"]
    pause = (args.pause_ms if args.pause_ms is not None else cfg["pause_ms"]) / 1e3
    out = args.out or os.path.join("benchmarks", "results", backend)
    if args.sparse_only and not args.out:  # never overwrite a whole run's results
        out = os.path.join(out, "sparse")
    names = [s for s in args.impls.split(",") if s]
    if args.no_sparse and args.sparse_only:
        parser.error("--no-sparse and --sparse-only exclude each other")
    sparse_shapes = cfg["sparse"]
    if args.sparse:
        try:
            sparse_shapes = [tuple(int(x) for x in s.split(":")) for s in args.sparse.split(",")]
        except ValueError:
            parser.error(f"--sparse {args.sparse!r}: expected log2(B*C):C:K[,...]")
    for shape in sparse_shapes:
        if len(shape) != 3 or min(shape) < 1:
            parser.error(f"--sparse {shape}: expected log2(B*C):C:K, all positive")
        log_n, classes, _ = shape
        if (1 << log_n) % classes or (1 << log_n) < classes:
            parser.error(f"--sparse {shape}: C must divide 2^{log_n}")
    if args.no_sparse:
        sparse_shapes = []
    torch_device = None
    if "torch" in names and impls.torch_available():
        import torch

        torch_device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
        if torch_device == "cpu" and backend == "gpu":
            torch_device = None  # never compare a GPU loss with PyTorch on the CPU

    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(),
        "backend": backend,
        **versions(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "command": "python -m benchmarks.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "env": USER_ENV,
        "preset": name,
        "repeats": repeats,
        "in_flight": in_flight,
        "pause_ms": pause * 1e3,
        "classes": impls.CLASSES,
        "sparse_shapes": [list(s) for s in sparse_shapes],
        "sparse_only": args.sparse_only,
    }
    _progress(f"{meta['device']}, jax {meta['jax']}, preset {name}, out {out}")
    records: list[dict] = []
    hlo_rows: list[dict] = []
    start = time.perf_counter()

    def run(case: Case, case_names: Sequence[str], sweep_flag: bool = False) -> None:
        recs, summary = run_case(
            case,
            case_names,
            repeats=repeats,
            in_flight=in_flight,
            torch_device=torch_device,
            pause=pause,
            dump_hlo=os.path.join(out, "hlo") if args.dump_hlo and not sweep_flag else None,
        )
        for r in recs:
            r["sweep"] = sweep_flag
        records.extend(recs)
        if summary is not None and not sweep_flag:
            hlo_rows.append({"case": case.label, "n": case.n, "summary": summary})
        jb = [r for r in recs if r["impl"] == "jaxbce"]
        if jb:
            r = jb[0]
            xo = f", {r['x_optax']:.2f}x optax" if "x_optax" in r else ""
            _progress(
                f"[{time.perf_counter() - start:6.1f}s] {case.mode:3s} {case.label:22s} "
                f"n=2^{case.n.bit_length() - 1}: jaxbce {r['ms']:.3f} ms, "
                f"{r['pct_copy']:.0f}% of copy{xo}{'' if r['verify']['ok'] else ' VERIFY FAILED'}"
            )

    # Dtype pair by dtype pair, so that the inputs of the largest size (and their float64
    # reference) are made once per pair: 1. the sweep, value_and_grad against size, every
    # implementation for f32/f32; 2. the tables at one size, options where the preset says.
    for logits, labels in [] if args.sparse_only else ALL_DTYPES:
        for k in [] if args.no_sweep else sweep:
            sweep_names = names if (logits, labels) == ("f32", "f32") else ["jaxbce"]
            run(Case(1 << k, logits, labels), sweep_names, sweep_flag=True)
        for mode in impls.MODES:
            for option in cfg["table_options"].get((logits, labels), ("none",)):
                if mode == "fwd" and option not in cfg["fwd_options"]:
                    continue
                run(Case(table_n, logits, labels, option, mode), names)
        partial = {"meta": meta, "table_n": table_n, "records": records, "hlo": hlo_rows}
        report.write_json(partial, out, "partial.json")
    # 3. sparse positive-index targets against the same labels given dense.
    sparse: list[dict] = []
    for log_n, classes, k in sparse_shapes:
        case = impls.SparseCase(1 << log_n, classes, k)
        recs = run_sparse_case(
            case,
            repeats=repeats,
            in_flight=in_flight,
            pause=pause,
            dump_hlo=os.path.join(out, "hlo") if args.dump_hlo else None,
        )
        sparse.extend(recs)
        r = {x["impl"]: x for x in recs}
        bad = [x["impl"] for x in recs if not x.get("verify", {"ok": True})["ok"]]
        _progress(
            f"[{time.perf_counter() - start:6.1f}s] sparse {case.label} n=2^{log_n}: "
            f"sparse {r['sparse']['ms']:.3f} ms, dense f32 {r['dense-f32']['ms']:.3f} ms, "
            f"{r['sparse']['x_dense_f32_paired']:.2f}x (paired), "
            f"{r['sparse']['pct_copy']:.0f}% of copy"
            + (f" VERIFY FAILED: {', '.join(bad)}" if bad else "")
        )
    # 4. a real train step.
    train = None
    if not args.no_train_step and not args.sparse_only:
        from benchmarks import train_step

        train = train_step.time_train_steps(repeats=max(5, repeats // 2))
        for cname, c in train["configs"].items():
            _progress(f"train step {cname}: {c['ms']} -> {c['speedup_vs_optax']:.2f}x optax")

    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    meta["seconds"] = round(time.perf_counter() - start, 1)
    result = {"meta": meta, "table_n": table_n, "records": records, "hlo": hlo_rows}
    result["train_step"] = train
    result["sparse"] = sparse
    paths = report.write(result, out)
    _progress(f"done in {meta['seconds']} s: " + ", ".join(paths.values()))
    if args.check:
        missed = [(w, v) for w, v, met in report.check(result) if met is False]
        print(f"{meta['device']}, jax {meta['jax']}, jaxlib {meta['jaxlib']}, {meta['date']}")
        for what, value, met in report.check(result):
            print(f"  {'-' if met is None else 'ok' if met else 'MISSED'}: {what}: {value}")
        bad = [r["case"] for r in records if r["impl"] == "jaxbce" and not r["verify"]["ok"]]
        if missed or bad:
            print(f"check FAILED: {len(missed)} target(s) missed, jaxbce wrong on {bad}")
            sys.exit(1)
        print("check passed")
    return result


if __name__ == "__main__":
    main()
