"""The examples' main job: every trainer with its defaults and the stability picture.

Trains the breast-cancer classifier, the digit tagger (with all labels, then with 30% of
the training labels missing), the rare-positives model without and with ``pos_weight``,
the extreme multi-label classifier (100,000 labels, fused linear loss) and the two-tower
SigLIP model, and draws the stability picture; prints one table of test metrics (every
row of the README's example table) and lists the files written.

    python examples/main.py --out out

This file is intentionally kept short; the logic lives in the trainers and trainlib.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import binary_classifier
import extreme_multilabel
import imbalanced
import jax
import multilabel_classifier
import siglip
import stability
import trainlib

# name -> (trainer module, settings other than its defaults)
JOBS = {
    "binary": (binary_classifier, {}),
    "multilabel": (multilabel_classifier, {}),
    "multilabel_missing": (multilabel_classifier, {"missing_fraction": 0.3}),
    "imbalanced": (imbalanced, {}),
    "extreme": (extreme_multilabel, {}),
    "siglip": (siglip, {}),
}

# (job, task, metric, key in its metrics, key of the baseline or None)
ROWS = (
    ("binary", "breast cancer", "test accuracy", "test_accuracy", "baseline_test_accuracy"),
    ("binary", "", "test ROC-AUC", "test_roc_auc", "baseline_test_roc_auc"),
    ("binary", "", "test log-loss", "test_log_loss", None),
    ("multilabel", "digit tags", "micro-F1", "micro_f1", "baseline_micro_f1"),
    ("multilabel", "", "macro-F1", "macro_f1", None),
    ("multilabel", "", "subset accuracy", "subset_accuracy", None),
    ("multilabel_missing", "30% labels missing", "micro-F1", "micro_f1", "baseline_micro_f1"),
    ("imbalanced", "2% positives", "recall, unweighted", "unweighted_recall", None),
    ("imbalanced", "", "recall, pos_weight", "pos_weight_recall", None),
    ("imbalanced", "", "precision, unweighted", "unweighted_precision", None),
    ("imbalanced", "", "precision, pos_weight", "pos_weight_precision", None),
    ("imbalanced", "", "PR-AUC, unweighted", "unweighted_pr_auc", None),
    ("imbalanced", "", "PR-AUC, pos_weight", "pos_weight_pr_auc", None),
    ("extreme", "100,000 labels", "precision@1", "precision_at_1", "baseline_precision_at_1"),
    ("extreme", "", "precision@5", "precision_at_5", "baseline_precision_at_5"),
    ("siglip", "image-caption pairs", "zero-shot accuracy", "zero_shot_accuracy", None),
    ("siglip", "", "recall@1 image->text", "image_to_text_recall_at_1", None),
    ("siglip", "", "recall@1 text->image", "text_to_image_recall_at_1", None),
)


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out", help="output directory (default: out)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    trainlib.add_distributed_flags(parser)
    args = parser.parse_args(argv)
    trainlib.init_distributed(args)

    results, seconds = {}, {}
    for name, (module, settings) in JOBS.items():
        start = time.perf_counter()
        config = module.Config(out=os.path.join(args.out, name), quiet=args.quiet, **settings)
        results[name] = module.train_and_evaluate(config)
        seconds[name] = time.perf_counter() - start
    start = time.perf_counter()
    if trainlib.is_main_process():
        results["stability"] = stability.run(os.path.join(args.out, "stability"))
    seconds["stability"] = time.perf_counter() - start

    if trainlib.is_main_process():
        print(summary_table(results, seconds))
        print(
            f"\n{jax.device_count()} {jax.default_backend()} device(s), "
            f"{jax.process_count()} process(es). Files written:"
        )
        for root, _, files in sorted(os.walk(args.out)):
            for name in sorted(files):
                print(f"  {os.path.join(root, name)}")
    return results


def summary_table(results: dict[str, dict], seconds: dict[str, float]) -> str:
    lines = [f"{'task':<20} {'metric':<22} {'jaxbce':>10} {'baseline':>10}", "-" * 65]
    for job, task, metric, key, base in ROWS:
        value = results[job][key]
        base_text = "" if base is None else f"{results[job][base]:.4f}"
        lines.append(f"{task:<20} {metric:<22} {value:>10.4f} {base_text:>10}")
    s = results.get("stability")
    if s is not None:
        for name in stability.METHODS:
            label = "stability" if name == "naive" else ""
            lines.append(
                f"{label:<20} {name + ': bad logits':<22} {s[name + '_bad_fraction']:>10.4g}"
            )
        worst = max(s["jaxbce_max_rel_err_loss"], s["jaxbce_max_rel_err_grad"])
        lines.append(f"{'':<20} {'jaxbce max rel. error':<22} {worst:>10.3g}")
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    lines.append(
        "baselines: LogisticRegression (one-vs-rest per tag for the digit tags); the most "
        "frequent training labels for the 100,000 labels."
    )
    lines.append("bad logits: fraction of z in [-100, 100] with a wrong/non-finite loss or grad.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
