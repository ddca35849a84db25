"""Writes a benchmark run as JSON, a Markdown report and a PNG plot."""

from __future__ import annotations

import json
import os
from typing import Any

IMPL_ORDER = ("jaxbce", "optax", "sigmoid-log", "torch", "copy")


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def _size(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)


def _per_element(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _rows(records: list[dict], mode: str, n: int | None = None) -> list[dict]:
    rows = [
        r
        for r in records
        if r["mode"] == mode and not r.get("sweep") and (n is None or r["n"] == n)
    ]
    return sorted(rows, key=lambda r: IMPL_ORDER.index(r["impl"]))


def table(records: list[dict], mode: str, n: int) -> str:
    """One row per case and implementation at size ``n``."""
    lines = [
        "| case | impl | ms | Gelem/s | GB/s | % of copy | x optax (paired) | verified |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cases: dict[str, list[dict]] = {}
    for r in _rows(records, mode, n):
        cases.setdefault(r["case"], []).append(r)
    for case, rows in cases.items():
        for r in rows:
            x = "-"
            if "x_optax" in r:
                paired = f"{r['x_optax_paired']:.2f}x" if r.get("interleaved", True) else "alone"
                x = f"{r['x_optax']:.2f}x ({paired})"
            pct = f"{r['pct_copy']:.0f}%" if "pct_copy" in r else "-"
            ok = "-" if r["impl"] == "copy" else ("yes" if r["verify"]["ok"] else "**NO**")
            lines.append(
                f"| {case} | {r['impl']} | {_fmt_ms(r['ms'])} | {r['elem_per_s'] / 1e9:.2f} | "
                f"{r['bytes_per_s'] / 1e9:.1f} | {pct} | {x} | {ok} |"
            )
    return "\n".join(lines)


def sweep_table(records: list[dict]) -> str:
    """value_and_grad ms and % of copy against size, one column per implementation."""
    sweep = [r for r in records if r.get("sweep")]
    if not sweep:
        return ""
    impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in sweep)]
    lines = ["| case | n | " + " | ".join(impls) + " |", "|---|---|" + "---|" * len(impls)]
    keys = sorted({(r["case"], r["n"]) for r in sweep}, key=lambda k: (k[0], k[1]))
    for case, n in keys:
        cells = []
        for impl in impls:
            r = [x for x in sweep if x["case"] == case and x["n"] == n and x["impl"] == impl]
            if not r:
                cells.append("")
            elif impl == "copy":
                cells.append(f"{_fmt_ms(r[0]['ms'])} ms")
            else:
                cells.append(f"{_fmt_ms(r[0]['ms'])} ms ({r[0]['pct_copy']:.0f}%)")
        lines.append(f"| {case} | {_size(n)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hlo_table(hlo: list[dict]) -> str:
    lines = [
        "| case | fusions (entry) | fusions reading logits / labels | temp bytes per element |",
        "|---|---|---|---|",
    ]
    for h in hlo:
        s = h["summary"]
        lines.append(
            f"| {h['case']} | {', '.join(s['fusions'])} | {s['logits_readers']} / "
            f"{s['labels_readers']} | {_per_element(s['temp_per_element'])} |"
        )
    return "\n".join(lines)


def train_table(train: dict[str, Any]) -> str:
    lines = [
        "| config | batch x tags | ms/step jaxbce | ms/step optax | speed-up (paired) |",
        "|---|---|---|---|---|",
    ]
    for name, c in train["configs"].items():
        lines.append(
            f"| {name} | {c['batch']} x {c['tags']} | {c['ms']['jaxbce']:.3f} | "
            f"{c['ms']['optax']:.3f} | {c['speedup_vs_optax']:.2f}x |"
        )
    return "\n".join(lines)


SPARSE_ORDER = (
    "sparse",
    "dense-f32",
    "dense-bool",
    "scatter+dense",
    "copy",
    "copy-f32",
    "copy-bool",
)
# The targets a run is checked against (``bench --check`` exits non-zero when one is
# missed). GPU: value_and_grad of the mean at the table's size, for every logits/labels
# dtype pair; CPU: f32/f32 against optax, interleaved.
GPU_PCT_COPY = 90.0  # % of a copy of the same bytes, every dtype pair
GPU_OPTION_POINTS = 10.0  # pos_weight / weight / where: within this many points of plain
GPU_X_OPTAX = 2.5  # f32/f32
GPU_X_TORCH = 7.0  # f32/f32, PyTorch eager forward + backward
GPU_SPARSE_X_DENSE = 1.4  # sparse targets vs dense f32 labels (paired)
CPU_X_OPTAX = 3.0  # f32/f32, median of per-round ratios
TEMP_PER_ELEMENT = 0.01  # bytes of temporaries per element: nothing N-sized
CPU_TEMP_CASES = ("f32/f32", "f32/bool", "f32/int8")  # no N-sized temporary on CPU


def sparse_table(sparse: list[dict]) -> str:
    """One row per shape and implementation of the sparse-targets comparison."""
    lines = [
        "| B x C, K | n | impl | ms | Gelem/s | floor B/elem | GB/s | % of copy | "
        "x dense f32 (paired) | temp B/elem | fusions reading logits | verified |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    shapes: dict[tuple, list[dict]] = {}
    for r in sparse:
        shapes.setdefault((r["n"], r["classes"], r["k"]), []).append(r)
    for rows in shapes.values():
        for r in sorted(rows, key=lambda r: SPARSE_ORDER.index(r["impl"])):
            copy = r["impl"].startswith("copy")
            pct = "-" if copy else f"{r['pct_copy']:.0f}% ({r['copy']})"
            ok = "-" if copy else ("yes" if r["verify"]["ok"] else "**NO**")
            readers = "-" if copy else r["hlo"]["logits_readers"]
            lines.append(
                f"| {r['case']} | {_size(r['n'])} | {r['impl']} | {_fmt_ms(r['ms'])} | "
                f"{r['elem_per_s'] / 1e9:.2f} | {r['bytes'] / r['n']:.2f} | "
                f"{r['bytes_per_s'] / 1e9:.1f} | {pct} | {r['x_dense_f32']:.2f}x "
                f"({r['x_dense_f32_paired']:.2f}x) | {_per_element(r['temp_per_element'])} | "
                f"{readers} | {ok} |"
            )
    return "\n".join(lines)


def sparse_targets(run: dict[str, Any], add: Any) -> None:
    """The sparse target, on the sparse rows of the largest size of this run."""
    rows = [r for r in run.get("sparse", []) if r["impl"] == "sparse"]
    if not rows:
        return
    n = max(r["n"] for r in rows)
    for r in (r for r in rows if r["n"] == n):
        what = f"sparse vg {r['case']} ({_size(n)}) >= {GPU_SPARSE_X_DENSE}x dense f32 (paired)"
        if run["meta"]["backend"] == "cpu":
            what += " (a GPU target; not judged on CPU)"
            add(what, r["x_dense_f32_paired"], None, "x")
        else:
            add(what, r["x_dense_f32_paired"], GPU_SPARSE_X_DENSE, "x")


def check(run: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """Every target of this run: ``(what, measured, met)``, ``met`` None where there is
    nothing to judge (a GPU target on a CPU run, or a value not measured)."""
    n = run["table_n"]
    rows = {(r["case"], r["impl"]): r for r in _rows(run["records"], "vg", n)}
    out: list[tuple[str, str, bool | None]] = []

    def add(what: str, value: float | None, goal: float | None, unit: str, most=False) -> None:
        if value is None:
            out.append((what, "not measured", None))
        else:
            met = None if goal is None else (value <= goal if most else value >= goal)
            out.append((what, f"{value:.2f}{unit}", met))

    def temporaries(case: str, summary: dict) -> None:
        temp = summary["temp_per_element"]
        add(f"{case}: temporaries <= {TEMP_PER_ELEMENT} B/element", temp, TEMP_PER_ELEMENT,
            " B/elem", most=True)  # fmt: skip

    jb = rows.get(("f32/f32", "jaxbce"), {})
    hlo = {h["case"]: h["summary"] for h in run.get("hlo", [])}
    if not run["records"]:
        pass  # --sparse-only
    elif run["meta"]["backend"] == "cpu":
        add(f"f32 vg at {_size(n)} >= {CPU_X_OPTAX:g}x optax (paired)",
            jb.get("x_optax_paired"), CPU_X_OPTAX, "x")  # fmt: skip
        for case in CPU_TEMP_CASES:
            if case in hlo:
                temporaries(case, hlo[case])
    else:
        plain = {c[0]: r["pct_copy"] for c, r in rows.items() if c[1] == "jaxbce"}
        for case, pct in plain.items():
            if "+" not in case:
                add(f"{case} vg at {_size(n)} >= {GPU_PCT_COPY:g}% of copy", pct,
                    GPU_PCT_COPY, "%")  # fmt: skip
            else:
                base = plain.get(case.split(" +")[0])
                gap = None if base is None else base - pct
                add(f"{case}: within {GPU_OPTION_POINTS:g} points of plain", gap,
                    GPU_OPTION_POINTS, " points", most=True)  # fmt: skip
        add(f"f32 vg >= {GPU_X_OPTAX:g}x optax", jb.get("x_optax"), GPU_X_OPTAX, "x")
        torch = rows.get(("f32/f32", "torch"))
        ratio = torch["ms"] / jb["ms"] if torch and jb else None
        add(f"f32 vg >= {GPU_X_TORCH:g}x PyTorch eager", ratio, GPU_X_TORCH, "x")
        for case, summary in hlo.items():
            temporaries(case, summary)
    sparse_targets(run, add)
    return out


def targets(run: dict[str, Any]) -> str:
    """The targets of :func:`check` as a Markdown table."""
    lines = ["| target | measured | met |", "|---|---|---|"]
    for what, value, met in check(run):
        lines.append(f"| {what} | {value} | {'-' if met is None else 'yes' if met else 'NO'} |")
    return "\n".join(lines)


def markdown(run: dict[str, Any]) -> str:
    meta = run["meta"]
    env = "".join(f"{k}={v} " for k, v in meta.get("env", {}).items())
    n = run["table_n"]
    parts = [
        f"# jaxbce benchmark: {meta['device']}",
        "",
        f"{meta['date']}, jax {meta['jax']}, jaxlib {meta['jaxlib']}, optax {meta['optax']}, "
        f"torch {meta['torch']}, {meta['cpu_count']} CPU cores, load average "
        f"{meta['load_before']} before / {meta['load_after']} after. Command: "
        f"`{env}{meta['command']}`",
        "",
        *([f"*{meta['note']}*", ""] if meta.get("note") else []),
        f"Median of {meta['repeats']} samples per function, {meta['in_flight']} call(s) in "
        f"flight per sample, {meta.get('pause_ms', 0):g} ms of sleep before each sample; the "
        "JAX functions of a case are sampled interleaved (round-robin)"
        + (
            (
                ", PyTorch on the CPU in a block of its own (*alone*: its threads keep "
                "spinning after each call and slow whatever runs next)"
                if meta["backend"] == "cpu"
                else ", PyTorch (CUDA) interleaved with them"
            )
            + ". *% of copy*: time of a copy of the "
            "same bytes (read logits and labels, write the gradient) over the time of the "
            "loss. *x optax*: optax's median over this one's; in brackets the median of the "
            "per-round ratios (robust to load on the machine)."
            if run["records"]
            else "; only the sparse targets in this run."
        ),
        "",
        "## Targets",
        "",
        targets(run),
        "",
    ]
    if run["records"]:
        parts += [f"## value_and_grad w.r.t. logits, n = {_size(n)}", ""]
        parts += [table(run["records"], "vg", n), ""]
        parts += [f"## forward only, n = {_size(n)}", "", table(run["records"], "fwd", n), ""]
    sweep = sweep_table(run["records"])
    if sweep:
        parts += ["## value_and_grad against size (ms, % of copy)", "", sweep, ""]
    if run.get("hlo"):
        parts += [f"## Compiled jaxbce value_and_grad, n = {_size(n)}", "", hlo_table(run["hlo"])]
        parts += [""]
    if run.get("sparse"):
        parts += [
            "## Sparse targets: value_and_grad w.r.t. logits",
            "",
            "`sparse_binary_cross_entropy_with_logits(logits, idx)` (f32 logits `[B, C]`, "
            "int32 positive indices `[B, K]`, each row 1 to K positives, the rest `-1`) "
            "against `binary_cross_entropy_with_logits` on the same labels given dense "
            "(f32, bool), and on labels scattered from the indices inside the jitted "
            "function (*scatter+dense*). *floor*: the bytes each must move once (sparse "
            "and scatter+dense: logits read, gradient written, indices read; dense: "
            "logits and labels read, gradient written); *copy*: a copy of the sparse "
            "floor's bytes, *copy-f32* / *copy-bool*: of the dense floors'. *x dense f32*: dense "
            "f32's median over this one's; in brackets the median of the per-round "
            "ratios. *temp*: XLA's temporary bytes per element "
            "(`compiled.memory_analysis()`); *fusions reading logits*: in the compiled "
            "entry computation (for sparse, one of them is the gather of K per row).",
            "",
            sparse_table(run["sparse"]),
            "",
        ]
    if run.get("train_step"):
        ts = run["train_step"]
        parts += ["## Jitted train step (multi-label example)", "", f"Model: {ts['source']}.", ""]
        parts += [train_table(ts), ""]
    return "\n".join(parts)


def plot(run: dict[str, Any], path: str) -> None:
    try:
        import matplotlib
    except ImportError:  # the plot is optional; the JSON and Markdown are written anyway
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in run["records"] if r.get("sweep")]
    if not sweep:
        return
    cases = sorted({r["case"] for r in sweep})
    main = [c for c in cases if any(r["case"] == c and r["impl"] == "optax" for r in sweep)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for impl in IMPL_ORDER:
        rows = sorted((r for r in sweep if r["impl"] == impl and r["case"] in main[:1]),
                      key=lambda r: r["n"])  # fmt: skip
        if rows:
            style = "--s" if impl == "copy" else "-o"
            ax.plot([r["n"] for r in rows], [r["elem_per_s"] for r in rows], style, label=impl)
    ax.set(xscale="log", yscale="log", xlabel="elements", ylabel="elements / s",
           title=f"value_and_grad, {main[0] if main else ''}")  # fmt: skip
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    ax = axes[1]
    for case in cases:
        rows = sorted((r for r in sweep if r["impl"] == "jaxbce" and r["case"] == case),
                      key=lambda r: r["n"])  # fmt: skip
        if rows:
            ax.plot([r["n"] for r in rows], [r["pct_copy"] for r in rows], "-o", label=case)
    ax.axhline(100, color="k", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="elements", ylabel="% of copy limit",
           title="jaxbce value_and_grad, % of a copy of the same bytes")  # fmt: skip
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{run['meta']['device']}, jax {run['meta']['jax']}, {run['meta']['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(run: dict[str, Any], out: str, name: str) -> str:
    """Writes ``run`` as JSON (also a run still in progress: ``partial.json``)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    with open(path, "w") as f:
        json.dump(run, f, indent=1, default=str)
    return path


def write(run: dict[str, Any], out: str) -> dict[str, str]:
    """Writes the JSON, the Markdown and the plot; removes the run's ``partial.json``."""
    write_json(run, out, "results.json")
    paths = {
        "json": os.path.join(out, "results.json"),
        "markdown": os.path.join(out, "results.md"),
        "plot": os.path.join(out, "throughput.png"),
    }
    with open(paths["markdown"], "w") as f:
        f.write(markdown(run))
    plot(run, paths["plot"])
    if not os.path.exists(paths["plot"]):  # no sweep in this run, or no matplotlib
        del paths["plot"]
    if os.path.exists(os.path.join(out, "partial.json")):
        os.remove(os.path.join(out, "partial.json"))
    return paths
