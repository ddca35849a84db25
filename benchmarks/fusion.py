"""What XLA compiles the loss into for a GPU (and a TPU), checked without one.

The loss is fast on a GPU only when XLA compiles value_and_grad into one kernel that
reads the logits and labels once and writes the gradient (plus the small second stage
of the sum). Whether it does is decided by XLA's GPU fusion passes, whose cost model
reads the device's description: an H200 (4.8 TB/s) got a different kernel split than
an H100 (3.35 TB/s) from the same code and the same jax. XLA can compile for a GPU it
does not see, from that description alone ("deviceless" ahead-of-time compilation), so
this check runs on any machine:

* every case of the benchmark's GPU table (logits {f32, bf16} x labels {f32, bool,
  int8} x options {none, pos_weight, weight, where}, value_and_grad of the mean and the
  forward, at 2^28 elements) is compiled for each device of :data:`CHECKED` (an H100,
  an H200 and a B200), or of ``--devices``;
* a case fails when more than one kernel reads the logits or XLA holds an N-sized
  temporary: for value_and_grad more than the bench's target of
  ``report.TEMP_PER_ELEMENT`` bytes per element, for the forward (whose ``where`` mean
  keeps two sets of row sums) one byte per element;
* ``--sweep`` also compiles the value_and_grad cases for an H100 whose memory
  bandwidth is set from 1 to 64 TB/s, to show how far each case is from a split;
* the losses that never form their logits (``benchmarks/linear.py`` and
  ``benchmarks/siglip.py``, their GPU shapes) are compiled too, with the materialized
  loss they replace: their temporary bytes against the GPU targets on memory;
* ``--tpu`` compiles the value_and_grad cases for the TPUs of :data:`TPUS` (libtpu
  compiles for a TPU topology without one; about 3 s a case), with the same criteria
  but for ``where``: XLA:TPU reads the inputs twice there (the mean's count and the
  loss in one pass, the gradient in another), which is reported, not judged.

It needs the CUDA plugin of the installed jaxlib (no GPU and no driver) and CUDA's
``ptxas`` on the PATH (XLA compiles the kernels to the end), and for ``--tpu`` the
libtpu that jax asks for::

    v=$(python -c "import jaxlib; print(jaxlib.__version__)")
    pip install "jax-cuda13-plugin==$v" "jax-cuda13-pjrt==$v" "jax[tpu]==$v"
    python -m benchmarks.fusion --check [--tpu] [--sweep]

The compilation is real, not the timing: a fused kernel can still be slow, which only a
GPU tells (``bench --gpu --check``). The device descriptions hold what XLA's cost model
reads (SM count, clock, memory bandwidth and size, caches and limits), from the vendors'
published figures; XLA's ``xla/backends/gpu/target_config/specs`` has its own.
"""

from __future__ import annotations

import os

# The CUDA plugin checks the CUDA libraries of a GPU machine when it loads; none are
# needed to compile, so the check is skipped (set before jax initializes its backends).
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # run nothing on a GPU, if there is one

import argparse  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from benchmarks import hlo, impls, linear, report, siglip  # noqa: E402
from benchmarks.impls import Case  # noqa: E402

LOG2N = 28


class Gpu(NamedTuple):
    """What XLA's cost model reads of a GPU, from the vendor's published figures."""

    capability: tuple[int, int]
    sms: int
    clock_ghz: float
    bandwidth: float  # memory, B/s
    memory: int  # bytes
    l2: int  # bytes
    name: str


DEVICES: dict[str, Gpu] = {
    "H100": Gpu((9, 0), 132, 1.98, 3.35e12, 80 << 30, 50 << 20, "NVIDIA H100 80GB HBM3"),
    "H200": Gpu((9, 0), 132, 1.98, 4.8e12, 141 << 30, 50 << 20, "NVIDIA H200"),
    "B200": Gpu((10, 0), 148, 1.965, 7.67e12, 178 << 30, 126 << 20, "NVIDIA B200"),
}
# Judged by --check by default (--devices picks others).
CHECKED = ("H100", "H200", "B200")
SWEEP_TBS = (1, 2, 3.35, 4.8, 8, 16, 32, 64)  # --sweep: memory bandwidths, TB/s
TPUS = {"TPU v5e": "v5e:2x2", "TPU v6e": "v6e:2x2"}  # --tpu: value_and_grad only

_CONFIG = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: {cores}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock}
  device_memory_size: {memory}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation"
  name: "{name}"
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{name}"
"""


def target_config(device: str, bandwidth: float | None = None) -> str:
    """The ``GpuTargetConfigProto`` (text) of ``device``, optionally with another memory
    bandwidth (B/s)."""
    d = DEVICES[device]
    return _CONFIG.format(
        cores=d.sms,
        clock=d.clock_ghz,
        bandwidth=int(bandwidth or d.bandwidth),
        memory=d.memory,
        l2=d.l2,
        major=d.capability[0],
        minor=d.capability[1],
        name=d.name,
    )


def gpu(config: str) -> jax.Device:
    """A compile-only CUDA device described by ``config``."""
    topology = topologies.get_topology_desc(
        "deviceless", platform="cuda", target_config=config, topology="1x1x1"
    )
    return topology.devices[0]


def tpu(topology: str) -> jax.Device:
    """A compile-only TPU, the first chip of ``topology`` (libtpu's names)."""
    return topologies.get_topology_desc(topology, "tpu").devices[0]


def _platform(device: jax.Device) -> str:
    return "cuda" if device.platform == "gpu" else device.platform


def cases(modes: Sequence[str] = impls.MODES) -> list[Case]:
    """The benchmark's GPU table at 2^28: every dtype pair and option, each mode."""
    n = 1 << LOG2N
    return [
        Case(n, z, y, option, mode)
        for mode in modes
        for z in impls.LOGIT_DTYPES
        for y in impls.LABEL_DTYPES
        for option in impls.OPTIONS
    ]


def compile_for(fn, device: jax.Device, shapes: Sequence[tuple[tuple[int, ...], Any] | None]):
    """``jax.jit(fn)`` compiled for ``device`` on arguments of ``(shape, dtype)`` (None
    passes None)."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    args = [None if s is None else jax.ShapeDtypeStruct(*s, sharding=sharding) for s in shapes]
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(_platform(device),)).compile()


def compile_case(case: Case, device: jax.Device) -> dict[str, Any]:
    """jaxbce's function of ``case`` compiled for ``device``: ``hlo.summarize``."""
    shape = (case.n // impls.CLASSES, impls.CLASSES)
    aux = {
        "none": None,
        "pos_weight": ((impls.CLASSES,), jnp.float32),
        "weight": ((impls.CLASSES,), jnp.float32),
        "where": (shape, jnp.bool_),
    }[case.option]
    shapes = [(shape, impls.LOGIT_DTYPES[case.logits]), (shape, impls.LABEL_DTYPES[case.labels])]
    compiled = compile_for(impls.jax_callable("jaxbce", case), device, [*shapes, aux])
    return hlo.summarize(compiled, case.n)


def one_kernel(summary: dict[str, Any], mode: str = "vg", readers: bool = True) -> bool:
    """One kernel reads the logits (unless not ``readers``), and no N-sized temporary."""
    most = report.TEMP_PER_ELEMENT if mode == "vg" else 1.0
    one = summary["logits_readers"] == 1 or not readers
    return one and 0 <= summary["temp_per_element"] < most


def _name(case: Case) -> str:
    return f"{case.mode} {case.label}"


def check(targets: dict[str, jax.Device]) -> list[str]:
    """Compiles every case for each device; prints a table, returns the failures."""
    failures = []
    for device, target in targets.items():
        extra = f", {DEVICES[device].bandwidth / 1e12:g} TB/s" if device in DEVICES else ""
        print(f"\n{device} ({target.device_kind}{extra})")
        print("| case | fusions (entry) | fusions reading logits / labels | temp B/elem | ok |")
        print("|---|---|---|---|---|")
        for case in cases(("vg",) if target.platform == "tpu" else impls.MODES):
            s = compile_case(case, target)
            judged = target.platform != "tpu" or case.option != "where"
            ok = one_kernel(s, case.mode, readers=judged)
            if not ok:
                failures.append(f"{device}: {_name(case)}")
            print(
                f"| {_name(case)} | {len(s['fusions'])} | {s['logits_readers']} / "
                f"{s['labels_readers']} | {s['temp_per_element']:.3f} | "
                f"{('yes' if s['logits_readers'] == 1 else 'yes, read twice') if ok else 'NO'} |",
                flush=True,
            )
    return failures


def _temp(fn, device: jax.Device, shapes: Sequence[tuple[tuple[int, ...], Any]]) -> int:
    """Temporary bytes of ``fn`` compiled for ``device`` on arguments of ``shapes``."""
    return int(compile_for(fn, device, shapes).memory_analysis().temp_size_in_bytes)


def scale_memory(devices: Sequence[str]) -> list[str]:
    """The fused linear loss and SigLIP at their benchmarks' GPU shapes (default chunk),
    and the materialized losses they replace: temporaries against the GPU targets."""
    failures = []
    print("\n| device | loss | shape | temp | materialized | ratio | target | ok |")
    print("|---|---|---|---|---|---|---|---|")
    for device in devices:
        target = gpu(target_config(device))
        for case in linear.PRESETS["gpu"]["cases"]:
            b, h, c, k, dt = case["B"], case["H"], case["C"], case["K"], case["dtype"]
            shapes = [((b, h), dt), ((h, c), dt), ((c,), dt), ((b, k), jnp.int32)]
            fused = _temp(lambda x, w, bias, i: linear.fused_fn(i, None)(x, w, bias), target,
                          shapes)  # fmt: skip
            mat = _temp(lambda x, w, bias, i: linear.materialized_fn(i)(x, w, bias), target,
                        shapes)  # fmt: skip
            goal = linear.TARGETS["gpu_temp_bytes"]
            ok = fused <= goal and mat / fused >= linear.TARGETS["gpu_temp_ratio"]
            what = f"B={b} H={h} C=2^{c.bit_length() - 1} {dt}"
            print(f"| {device} | linear | {what} | {fused / 1e6:.1f} MB | {mat / 1e9:.2f} GB | "
                  f"{mat / fused:.0f}x | <= {goal / 1e9:g} GB, >= "
                  f"{linear.TARGETS['gpu_temp_ratio']:g}x | {'yes' if ok else 'NO'} |")  # fmt: skip
            if not ok:
                failures.append(f"{device}: linear {what}")
        cfg = siglip.PRESETS["gpu"]
        b, d, dt = cfg["batch"], cfg["dim"], cfg["dtype"]
        shapes = [((b, d), dt), ((b, d), dt), ((), jnp.float32), ((), jnp.float32)]
        fused = _temp(siglip.siglip_fn(None), target, shapes)
        mat = _temp(siglip.materialized_fn(), target, shapes)
        goal = siglip.GPU_TARGETS["temp_ratio"]
        ok = mat / fused >= goal
        print(f"| {device} | siglip | B={b} D={d} {dt} | {fused / 1e6:.1f} MB | "
              f"{mat / 1e9:.2f} GB | {mat / fused:.0f}x | >= {goal:g}x | "
              f"{'yes' if ok else 'NO'} |", flush=True)  # fmt: skip
        if not ok:
            failures.append(f"{device}: siglip B={b}")
    return failures


def sweep(device: str = "H100") -> None:
    """value_and_grad cases compiled for ``device`` at each bandwidth of SWEEP_TBS."""
    targets = {tbs: gpu(target_config(device, tbs * 1e12)) for tbs in SWEEP_TBS}
    print(f"\n{device} with the memory bandwidth set to (TB/s): one kernel?")
    print("| case | " + " | ".join(f"{t:g}" for t in SWEEP_TBS) + " |")
    print("|---|" + "---|" * len(SWEEP_TBS))
    for case in cases(modes=("vg",)):
        marks = ["yes" if one_kernel(compile_case(case, t)) else "NO" for t in targets.values()]
        print(f"| {case.label} | " + " | ".join(marks) + " |", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", nargs="+", default=list(CHECKED), choices=list(DEVICES))
    ap.add_argument("--check", action="store_true", help="exit 1 if a case is not one kernel")
    ap.add_argument("--sweep", action="store_true", help="also sweep the memory bandwidth")
    ap.add_argument("--tpu", action="store_true", help="also compile for the TPUS")
    args = ap.parse_args(argv)
    import jaxlib

    print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}; compiled without the devices")
    targets = {d: gpu(target_config(d)) for d in args.devices}
    if args.tpu:
        targets |= {name: tpu(topology) for name, topology in TPUS.items()}
    failures = check(targets) + scale_memory(args.devices)
    if args.sweep:
        sweep()
    if failures:
        print(f"\n{len(failures)} case(s) failed:", *failures, sep="\n  ")
    else:
        print(f"\nevery case is one kernel and every temporary within its target on "
              f"{', '.join(targets)}")  # fmt: skip
    return 1 if failures and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
