"""Checks that a change leaves the GPU code of the loss as it was, without a GPU.

Lowers the jitted forward and value_and_grad of ``binary_cross_entropy_with_logits`` for
CUDA (``lowering_platforms=("cuda",)``, which works on a CPU-only machine) for logits
{f32, bf16, f16} x labels {f32, bool, int8} x options, in two checkouts, canonicalizes
the StableHLO (inline, canonicalize, cse) and compares. Identical StableHLO compiles to
the same GPU code with the same XLA.

    python -m experiments.compare_gpu_lowering OLD_CHECKOUT NEW_CHECKOUT

(e.g. ``git worktree add /tmp/old <rev>``). Differences confined to ``convert`` ops
and the returned values are listed apart from others.
"""

from __future__ import annotations

import difflib
import pickle
import re
import subprocess
import sys
import tempfile

LOWER = r"""
import pickle, sys, jax, jax.numpy as jnp, numpy as np
import jaxbce
fn = jaxbce.binary_cross_entropy_with_logits
fn = getattr(fn, "__wrapped__", fn)  # the loss itself, not its eager-call cache
out = {}
for zd in (jnp.float32, jnp.bfloat16, jnp.float16):
    for yd in (jnp.float32, jnp.bool_, jnp.int8):
        for opt in ("none", "pos_weight", "weight", "where", "smooth"):
            def f(z, y, e, opt=opt):
                k = {"pos_weight": {"pos_weight": e}, "weight": {"weight": e},
                     "where": {"where": e > 0}, "smooth": {"label_smoothing": 0.1}}.get(opt, {})
                return fn(z, y, **k).astype(jnp.float32)
            args = (jax.ShapeDtypeStruct((64, 256), zd), jax.ShapeDtypeStruct((64, 256), yd),
                    jax.ShapeDtypeStruct((256,), jnp.float32))
            for mode, g in (("vg", jax.value_and_grad(f)), ("fwd", f)):
                key = f"{np.dtype(zd).name}/{np.dtype(yd).name}/{opt}/{mode}"
                out[key] = jax.jit(g).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
pickle.dump(out, open(sys.argv[1], "wb"))
"""


def lower(checkout: str) -> dict[str, str]:
    with tempfile.NamedTemporaryFile(suffix=".pkl") as f:
        env = {"PYTHONPATH": checkout, "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
        subprocess.run([sys.executable, "-c", LOWER, f.name], env=env, check=True, cwd=checkout)
        return pickle.load(open(f.name, "rb"))


def canonical(text: str) -> str:
    from jax._src.interpreters import mlir as jmlir
    from jaxlib.mlir import ir, passmanager

    with jmlir.make_ir_context():
        module = ir.Module.parse(text)
        passmanager.PassManager.parse("builtin.module(inline,canonicalize,cse,symbol-dce)").run(
            module.operation
        )
        text = str(module)
    return re.sub(r'loc\([^)]*\)|jax.result_info = "[^"]*"', "", text)


def main() -> None:
    old, new = lower(sys.argv[1]), lower(sys.argv[2])
    same, converts, other = [], [], []
    for key in old:
        a, b = canonical(old[key]), canonical(new[key])
        if a == b:
            same.append(key)
            continue
        lines = difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="", n=0)
        changed = [ln for ln in lines if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]

        def norm(ln):
            return re.sub(r"%[\w#]+", "%", ln[1:]).strip()

        gone = [norm(ln) for ln in changed if ln.startswith("-")]
        came = [norm(ln) for ln in changed if ln.startswith("+")]
        extra = [ln for ln in gone if ln not in came] + [ln for ln in came if ln not in gone]
        if all("convert" in ln or ln.startswith("return") for ln in extra):
            converts.append(key)
        else:
            other.append((key, extra[:8]))
    print(f"{len(same)} of {len(old)} identical; {len(converts)} differ only in converts")
    for key, extra in other:
        print("DIFFERS:", key, *extra, sep="\n  ")


if __name__ == "__main__":
    main()
