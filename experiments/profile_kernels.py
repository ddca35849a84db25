"""Run each probe variant's compiled value_and_grad once, for ``ncu`` to count what the
kernels execute (instructions per element, issue utilisation, DRAM throughput):

    ncu --clock-control none --metrics smsp__inst_executed.sum,... \\
        python -m experiments.profile_kernels --dtypes bf16/bool --log2n 26

Each variant runs twice (the first call may load the module); the kernels appear in
``ncu``'s report in the order of ``experiments.formulations.variants``, named after the
variant in the printed order.
"""

from __future__ import annotations

import argparse

import jax

from benchmarks import impls
from experiments import formulations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log2n", type=int, default=26)
    parser.add_argument("--dtypes", default="bf16/bool")
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    args = parser.parse_args()
    n = 1 << args.log2n
    for pair in args.dtypes.split(","):
        logits, labels = pair.split("/")
        host = impls.host_inputs(n, logits, labels)
        z, y = jax.device_put(host["z"]), jax.device_put(host["y"])
        for name, fn in formulations.variants(labels).items():
            if args.only and name not in args.only.split(","):
                continue
            compiled = jax.jit(fn).lower(z, y).compile()
            for _ in range(2):
                jax.block_until_ready(compiled(z, y))
            print(f"ran {pair} {name}", flush=True)


if __name__ == "__main__":
    main()
