"""Summarise ``ncu``'s source page (SASS with counters) of the fused loss kernels, as
written by ``experiments/probe_gpu.sh``: per kernel, instructions per element by opcode,
where the warps stalled, and where each global load sits in the code (a wait right after
a load in the middle of the code is a load phase whose latency the warp does not hide).

    python -m experiments.sass_summary SASS.csv LOG2N [NAME_PREFIX]
"""

from __future__ import annotations

import collections
import csv
import sys


def kernels(path: str) -> list[dict]:
    """The kernels of the CSV, each ``{"name", "header", "rows"}``, in report order."""
    out: list[dict] = []
    for row in csv.reader(open(path)):
        if row and row[0] == "Kernel Name":
            out.append({"name": row[1], "rows": []})
        elif row and row[0] == "Address":
            out[-1]["header"] = row
        elif row and out:
            out[-1]["rows"].append(row)
    return out


def summarize(kernel: dict, n: int) -> str:
    hdr, rows = kernel["header"], kernel["rows"]
    src, executed = hdr.index("Source"), hdr.index("Instructions Executed")
    samples = hdr.index("Warp Stall Sampling (All Samples)")
    stalls = [i for i, h in enumerate(hdr) if h.startswith("stall_") and "Not Issued" not in h]

    def num(s: str) -> float:
        return float(s.replace(",", "") or 0)

    ops: collections.Counter = collections.Counter()
    why: collections.Counter = collections.Counter()
    total_samples = sum(num(r[samples]) for r in rows)
    lines = []
    for i, r in enumerate(rows):
        op = next(w for w in r[src].split() if not w.startswith("@"))
        ops[op] += num(r[executed]) * 32 / n
        for j in stalls:
            why[hdr[j][6:]] += num(r[j])
        if "LDG" in r[src] or num(r[samples]) > 0.05 * total_samples:
            lines.append(f"    {i:4d} {int(num(r[samples])):6d}  {r[src].strip()}")
    out = [f"{kernel['name']}: {sum(ops.values()):.1f} instructions per element"]
    out.append("  " + ", ".join(f"{o} {c:.2f}" for o, c in ops.most_common(12)))
    out.append(
        "  stalls: " + ", ".join(f"{w} {c / total_samples:.0%}" for w, c in why.most_common(6))
    )
    out.append("  loads and hot spots (line, stall samples, SASS):")
    return "\n".join(out + lines)


def main() -> None:
    path, n = sys.argv[1], 1 << int(sys.argv[2])
    prefix = sys.argv[3] if len(sys.argv) > 3 else "input_convert_reduce"
    for k in kernels(path):
        if k["name"].startswith(prefix):
            print(summarize(k, n), end="\n\n")


if __name__ == "__main__":
    main()
