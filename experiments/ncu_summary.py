"""Summarise an ``ncu --csv --page raw`` report of ``experiments.profile_kernels``: per
kernel its time, instructions and special-function instructions per element, issue
utilisation, DRAM throughput, occupancy, registers and launch shape.

    python -m experiments.ncu_summary REPORT.csv LOG2N
"""

from __future__ import annotations

import csv
import sys

METRICS = (
    "smsp__inst_executed.sum,smsp__inst_executed_pipe_xu.sum,"
    "smsp__issue_active.avg.pct_of_peak_sustained_active,"
    "dram__throughput.avg.pct_of_peak_sustained_elapsed,"
    "sm__warps_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum,"
    "launch__registers_per_thread,launch__grid_size,launch__block_size"
)


def _num(s: str) -> float:
    return float(s.replace(",", ""))


def main() -> None:
    path, log2n = sys.argv[1], int(sys.argv[2])
    n = 1 << log2n
    rows = list(csv.reader(open(path)))
    head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    hdr, data = rows[head], rows[head + 2 :]

    def get(r, k):
        return r[hdr.index(k)]

    for r in data:
        instr = _num(get(r, "smsp__inst_executed.sum")) * 32 / n
        xu = _num(get(r, "smsp__inst_executed_pipe_xu.sum")) * 32 / n
        print(
            f"{get(r, 'Kernel Name')[:36]:36s} {get(r, 'gpu__time_duration.sum'):>9s} ns "
            f"instr/elem {instr:6.1f} xu/elem {xu:5.2f} "
            f"issue {get(r, 'smsp__issue_active.avg.pct_of_peak_sustained_active'):>6s}% "
            f"dram {get(r, 'dram__throughput.avg.pct_of_peak_sustained_elapsed'):>6s}% "
            f"occ {get(r, 'sm__warps_active.avg.pct_of_peak_sustained_active'):>6s}% "
            f"regs {get(r, 'launch__registers_per_thread')} "
            f"grid {get(r, 'launch__grid_size')} x {get(r, 'launch__block_size')}"
        )


if __name__ == "__main__":
    main()
