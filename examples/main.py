"""The examples' main job: both trainers and the stability picture, default settings.

Trains the breast-cancer classifier and the digit tagger with their defaults, draws the
stability picture, prints one table of test metrics and lists the files written.

    python examples/main.py --out out

This file is intentionally kept short; the logic lives in the trainers and trainlib.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import binary_classifier
import jax
import multilabel_classifier
import numpy as np
import stability
import trainlib


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out", help="output directory (default: out)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    trainlib.add_distributed_flags(parser)
    args = parser.parse_args(argv)
    trainlib.init_distributed(args)
    out, quiet = args.out, args.quiet

    results, seconds = {}, {}
    start = time.perf_counter()
    config = binary_classifier.Config(out=os.path.join(out, "binary"), quiet=quiet)
    results["binary"] = binary_classifier.train_and_evaluate(config)
    seconds["binary"] = time.perf_counter() - start

    start = time.perf_counter()
    config = multilabel_classifier.Config(out=os.path.join(out, "multilabel"), quiet=quiet)
    results["multilabel"] = multilabel_classifier.train_and_evaluate(config)
    seconds["multilabel"] = time.perf_counter() - start

    start = time.perf_counter()
    if trainlib.is_main_process():
        results["stability"] = stability.run(os.path.join(out, "stability"))
    seconds["stability"] = time.perf_counter() - start

    if trainlib.is_main_process():
        print(summary_table(results, seconds))
        print(
            f"\n{jax.device_count()} {jax.default_backend()} device(s), "
            f"{jax.process_count()} process(es). Files written:"
        )
        for root, _, files in sorted(os.walk(out)):
            for name in sorted(files):
                print(f"  {os.path.join(root, name)}")
    return results


def summary_table(results: dict[str, dict], seconds: dict[str, float]) -> str:
    b, m, s = results["binary"], results["multilabel"], results.get("stability")
    rows = [
        ("breast cancer", "test accuracy", b["test_accuracy"], b["baseline_test_accuracy"]),
        ("", "test ROC-AUC", b["test_roc_auc"], b["baseline_test_roc_auc"]),
        ("", "test log-loss", b["test_log_loss"], None),
        ("", "seconds", seconds["binary"], None),
        ("digit tags", "micro-F1", m["micro_f1"], m["baseline_micro_f1"]),
        ("", "macro-F1", m["macro_f1"], None),
        ("", "subset accuracy", m["subset_accuracy"], None),
        ("", "min per-tag ROC-AUC", float(np.min(m["per_tag_roc_auc"])), None),
        ("", "seconds", seconds["multilabel"], None),
    ]
    if s is not None:
        for name in stability.METHODS:
            label = "stability" if name == "naive" else ""
            rows.append((label, f"{name}: bad logits", s[f"{name}_bad_fraction"], None))
        worst = max(s["jaxbce_max_rel_err_loss"], s["jaxbce_max_rel_err_grad"])
        rows.append(("", "jaxbce max rel. error", worst, None))
    lines = [f"{'task':<14} {'metric':<22} {'jaxbce':>10} {'baseline':>10}", "-" * 59]
    for task, metric, value, base in rows:
        base_text = "" if base is None else f"{base:.4f}"
        lines.append(f"{task:<14} {metric:<22} {value:>10.4g} {base_text:>10}")
    lines.append("baselines: LogisticRegression; one-vs-rest LogisticRegression per tag.")
    lines.append("bad logits: fraction of z in [-100, 100] with a wrong/non-finite loss or grad.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
