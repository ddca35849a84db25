"""Probe, CPU: can the mean loss read bool labels with no N-sized temporary, and at what
cost?

XLA:CPU hands the loss's sum to YNNPACK, which reads no ``pred`` array (and JAX has no
bitcast from bool), so the shipped kernel (``jaxbce._core.CPU_HARD``) has XLA write the
labels' sign as one int8 per element first: 1 B/element. The one way found to read the
bool array directly is to keep the labels out of YNNPACK's fusion altogether:

- ``split-K``: ``sum(log1p(exp(-|z|)))`` in YNNPACK (logits only), plus the labels'
  term ``max(c z, 0)`` (``c = 1 - 2 y``) summed over rows of ``K`` elements by a
  two-output reduce in XLA's loop emitter (YNNPACK takes no variadic reduce, and a
  one-output reduce is handed to it again, with the select materialized), split into
  positives and negatives so that the two outputs are both used; then the row sums.
  Three sums of non-negative terms: no cancellation. The gradient is the shipped one
  (``_core._grad_cpu_hard``).

Variants that did not do it, for the record: a select inside the summed loss (YNNPACK
takes the reduction and materializes the select and a zero broadcast, 8 B/element); the
whole loss in a two-output reduce to a scalar (no temporary, but XLA:CPU sums
sequentially: 14x slower and off by 8e-4 relative at 2^22) or over rows (no temporary,
about 10x slower: XLA's own exp and log1p); a reduce over columns (3x slower);
reshapes to rank 9, 11 and 12, or reducers written as ``a - (-b)`` (simplified back into
YNNPACK's sum).

Times value_and_grad of the mean w.r.t. the logits ("vg") and the mean alone ("fwd") on
the benchmark's inputs (``benchmarks.impls``), interleaved round-robin
(``bench.time_interleaved``), and reports each variant's median time, its median ratio
to the shipped loss in the same rounds, its temporaries (``memory_analysis``) and its
error against the benchmark's float64 reference.

    python -m experiments.cpu_bool_labels [--log2n 22] [--rounds 41]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxbce
from benchmarks import bench, impls
from jaxbce import _core


def split_mean(k: int):
    """The mean loss of bool labels as three sums (see the module's docstring)."""

    def loss_sum(z, y):
        # YNNPACK converts the logits in its fusion; the loop fusion widens them its own
        # way (``_core._widen``), lest the conversion be shared and materialized.
        lg = jnp.sum(jnp.log1p(jnp.exp(-jnp.abs(z.astype(jnp.float32)))))
        zc = _core._widen(z, jnp.float32)
        zero = jnp.zeros((), jnp.float32)
        t_pos = jnp.where(y, jnp.maximum(-zc, zero), zero).reshape(-1, k)
        t_neg = jnp.where(y, zero, jnp.maximum(zc, zero)).reshape(-1, k)
        pos, neg = jax.lax.reduce(
            (t_pos, t_neg), (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]), (1,)
        )
        return lg + (jnp.sum(pos) + jnp.sum(neg))

    @jax.custom_jvp
    def mean(z, y):
        return loss_sum(z, y) / z.size  # float32, as the shipped mean

    @mean.defjvp
    def _rule(primals, tangents):
        z, y = primals
        dz, _ = tangents
        g = _core._grad_cpu_hard(z, y, None)
        return mean(z, y), jnp.sum(g * dz.astype(g.dtype)) / z.size

    return mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log2n", type=int, default=22)
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--rows", type=int, nargs="+", default=[512, 2048])
    args = ap.parse_args()
    n = 1 << args.log2n
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, n = 2^{args.log2n}")
    for logits in impls.LOGIT_DTYPES:
        host = impls.host_inputs(n, logits, "bool")  # the bench's inputs and reference
        z, y = jnp.asarray(host["z"]), jnp.asarray(host["y"])
        true = impls.reference(n, logits, "bool")["none"]["loss"]
        variants = {"shipped": lambda z, y: jaxbce.binary_cross_entropy_with_logits(z, y)}
        variants |= {f"split-{k}": split_mean(k) for k in args.rows}
        for mode in ("vg", "fwd"):
            runners = {}
            for name, fn in variants.items():
                f = jax.value_and_grad(fn) if mode == "vg" else fn
                c = jax.jit(f).lower(z, y).compile()
                runners[name] = (functools.partial(c, z, y), jax.block_until_ready)
                out = c(z, y)
                value = float(out[0] if mode == "vg" else out)
                temp = c.memory_analysis().temp_size_in_bytes / n
                print(
                    f"{logits}/bool {mode:3s} {name:10s} temporaries {temp:.4f} B/element,"
                    f" mean {value:.7g} (float64 {true:.7g}, relative error"
                    f" {abs(value / true - 1):.1e})"
                )
            times = bench.time_interleaved(runners, repeats=args.rounds, in_flight=1, pause=0.005)
            for name, ts in times.items():
                ratio = np.median(ts / times["shipped"])
                print(f"  {name:10s} {1e3 * np.median(ts):6.2f} ms, {ratio:.2f}x the shipped")


if __name__ == "__main__":
    main()
