"""Probe, without a GPU: the machine code of the fused loss + gradient kernel.

Compiles jaxbce's value_and_grad of the mean (the bench's cases at 2^28) for a GPU of
``benchmarks.fusion.DEVICES`` without one, keeps what XLA writes with ``--xla_dump_to``,
assembles the PTX of the kernel that reads the logits with ``ptxas`` for sm_90a and
counts its SASS (``cuobjdump -sass``): instructions per element (the kernel's static
instructions per thread over the elements a thread handles, from its launch grid),
special-function (MUFU) ops, global loads and registers. A static count, not a
profile: it tells two formulations apart where no GPU is at hand (the kernels are
straight-line code; a loop is reported).

    python -m experiments.sass_deviceless [--device H200] [--cases bf16/bool f32/f32]

Needs what ``benchmarks/fusion.py`` needs, plus ``cuobjdump`` (``pip install
nvidia-cuda-cuobjdump``; give its path with ``--cuobjdump`` if it is not on the PATH).
"""

from __future__ import annotations

import os
import tempfile

_DUMP = tempfile.mkdtemp(prefix="xla-dump-")
# jax 0.11's XLA writes the kernels' PTX only for the fusions that the emitter regex names.
_FLAGS = f"--xla_dump_to={_DUMP} --xla_dump_emitter_re=.*"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAGS}".strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

from benchmarks import fusion, impls  # noqa: E402
from benchmarks.impls import Case  # noqa: E402

_THUNK = re.compile(r"\] (\S+) grid: \[(\d+), (\d+), (\d+)\] threads: \[(\d+), (\d+), (\d+)\]")
_SASS = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def _new_module(before: set[str]) -> str:
    """The dump-file prefix of the module compiled since ``before`` was listed."""
    new = sorted(set(glob.glob(f"{_DUMP}/*.thunk_sequence.txt")) - before)
    assert len(new) == 1, new
    return new[0].removesuffix(".thunk_sequence.txt")


def _logits_kernel(prefix: str) -> tuple[str, int]:
    """The first kernel of the module (the one reading the logits) and its threads."""
    with open(prefix + ".thunk_sequence.txt") as f:
        name, *dims = _THUNK.search(f.read()).groups()
    gx, gy, gz, tx, ty, tz = map(int, dims)
    return name, gx * gy * gz * tx * ty * tz


def sass(prefix: str, kernel: str, cuobjdump: str) -> list[str]:
    """The SASS opcodes of ``kernel`` (its PTX file assembled for sm_90a)."""
    ptx = next(p for p in glob.glob(prefix + "*.ptx") if f".entry {kernel}(" in open(p).read())
    cubin = ptx.removesuffix(".ptx") + ".cubin"
    subprocess.run(["ptxas", "-arch=sm_90a", "-O3", ptx, "-o", cubin], check=True)
    out = subprocess.run([cuobjdump, "-sass", cubin], check=True, capture_output=True, text=True)
    text = out.stdout.split(f"Function : {kernel}")[-1].split("Function :")[0]
    return [op for op in _SASS.findall(text) if op != "NOP"]


def kernel_sass(compile_fn, n: int, cuobjdump: str) -> tuple[object, dict]:
    """``compile_fn()`` (which compiles one module, of ``n`` elements) and the SASS
    statistics of its first kernel, the one reading the logits."""
    before = set(glob.glob(f"{_DUMP}/*.thunk_sequence.txt"))
    result = compile_fn()
    prefix = _new_module(before)
    kernel, threads = _logits_kernel(prefix)
    ops = sass(prefix, kernel, cuobjdump)
    per_thread = n // threads
    count = collections.Counter(op.split(".")[0] for op in ops)
    return result, {
        "kernel": kernel,
        "elements_per_thread": per_thread,
        "sass_per_element": round(len(ops) / per_thread, 1),
        "mufu_per_element": {
            op: k / per_thread
            for op, k in sorted(collections.Counter(ops).items())
            if op.startswith("MUFU")
        },
        "ldg": count["LDG"],
        "loop": any(op.startswith("BRA") for op in ops[:-2]),
    }


def measure(case: Case, device, cuobjdump: str) -> dict:
    summary, stats = kernel_sass(lambda: fusion.compile_case(case, device), case.n, cuobjdump)
    return {"case": case.label, **stats, "one_kernel": fusion.one_kernel(summary)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="H200", choices=["H100", "H200"])  # sm_90a
    ap.add_argument(
        "--cases",
        nargs="+",
        default=[f"{z}/{y}" for z in impls.LOGIT_DTYPES for y in impls.LABEL_DTYPES],
    )
    ap.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or "cuobjdump")
    args = ap.parse_args()
    device = fusion.gpu(fusion.target_config(args.device))
    for name in args.cases:
        z, y = name.split("/")
        print(json.dumps(measure(Case(1 << fusion.LOG2N, z, y), device, args.cuobjdump)))
    shutil.rmtree(_DUMP, ignore_errors=True)


if __name__ == "__main__":
    main()
