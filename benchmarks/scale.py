"""What the benchmarks of the losses without logits (``linear``, ``siglip``) share: run
metadata, writing the results, per-round ratios, errors and compiled temporaries."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import bench


def metadata(module: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """Where, when and how a benchmark runs (call before measuring; ``finish`` adds the
    load after and the duration)."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": bench.device_name(),
        "backend": jax.default_backend(),
        **bench.versions(),
        "python": platform.python_version(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "command": f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv),
        "env": bench.USER_ENV,
        "start": time.time(),
    }


def finish(out: str, run: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> None:
    """Adds the load after and the duration to ``run["meta"]``, writes ``results.json``
    and ``results.md`` (``render(run)``) into ``out``, and prints the latter."""
    meta = run["meta"]
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    meta["seconds"] = time.time() - meta.pop("start")
    text = render(run)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(run, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)


def errors(got, want) -> list[float]:
    """``max |got - want| / max |want|`` for the loss and each gradient."""
    (v, g), (wv, wg) = got, want
    out = [abs(float(v) - float(wv)) / abs(float(wv))]
    for a, w in zip(g, wg, strict=True):
        a, w = (np.asarray(t).astype(np.float64) for t in (a, w))
        out.append(float(np.max(np.abs(a - w)) / np.max(np.abs(w))))
    return out


def temp_bytes(fn, *args) -> int:
    return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def ratios(num: np.ndarray, den: np.ndarray) -> dict[str, float]:
    """The median and quartiles of the per-round ratios ``num / den``."""
    r = num / den
    return {
        "median": float(np.median(r)),
        "p25": float(np.percentile(r, 25)),
        "p75": float(np.percentile(r, 75)),
    }


def gb(n: float | None) -> str:
    if n is None:
        return "failed to compile"
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def ratio_text(d: dict[str, float]) -> str:
    return f"{d['median']:.2f}x ({d['p25']:.2f}-{d['p75']:.2f})"


def parser(doc: str, quick: str, gpu: str) -> argparse.ArgumentParser:
    """The command line both benchmarks share: ``--quick`` (CPU, the default) or
    ``--gpu`` presets, ``--out`` and ``--repeats``."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help=quick)
    preset.add_argument("--gpu", action="store_true", help=gpu)
    p.add_argument("--out", default=None, help="output directory")
    p.add_argument("--repeats", type=int, default=None, help="rounds of timing")
    return p


def progress(tag: str, msg: str) -> None:
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


def exit_if_wrong(tag: str, failed: list[str]) -> None:
    """Exit 1, naming them, when any implementation's result failed its check."""
    if failed:
        progress(tag, f"FAILED correctness: {failed}")
        sys.exit(1)
