"""What the jaxbce Flax examples share: flags, devices, batches, the loop, metrics, plots.

The trainers (``binary_classifier.py``, ``multilabel_classifier.py``, ``imbalanced.py``)
keep the model, the loss and the jitted steps; this module keeps everything else, so a
trainer reads top to bottom on one screen.

Data parallelism: one ``Mesh`` over every device of every process, with one axis
``"data"``. Batches are sharded over it (``NamedSharding(mesh, P("data"))``) and the
model and optimizer state are replicated (``P()``), so XLA inserts the gradient
all-reduce. One CPU is the same code path as 8 GPUs or 2 hosts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import matplotlib
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn import metrics as skm
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

# The split never moves: --seed changes the initialisation and the shuffling only.
SPLIT_SEED = 0

Split = dict[str, np.ndarray]  # {"x": features, "y": labels}, rows aligned


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings every trainer takes; each trainer subclasses it with its own defaults."""

    epochs: int = 50
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    out: str | None = None
    quiet: bool = False


# ----------------------------------------------------------------------------- flags


def parse_config(config_cls: type, description: str | None, argv: Sequence[str] | None):
    """Flags from the fields of ``config_cls`` (``--batch-size``...), plus the distributed
    flags; calls ``jax.distributed.initialize`` when they ask for it. Returns the config."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, bool):
            parser.add_argument(flag, action="store_true", help=f"(default {field.default})")
        else:
            kind = str if field.default is None else type(field.default)
            parser.add_argument(
                flag, type=kind, default=field.default, help="(default %(default)s)"
            )
    add_distributed_flags(parser)
    args = parser.parse_args(argv)
    init_distributed(args)
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """Multi-host flags; each defaults to the standard environment variable."""
    env = os.environ.get
    group = parser.add_argument_group("multi-process (JAX distributed runtime)")
    group.add_argument(
        "--coordinator-address",
        default=env("JAX_COORDINATOR_ADDRESS"),
        help="host:port of process 0 (env JAX_COORDINATOR_ADDRESS)",
    )
    group.add_argument(
        "--num-processes",
        type=int,
        default=int(env("JAX_NUM_PROCESSES", "0")) or None,
        help="number of processes (env JAX_NUM_PROCESSES)",
    )
    group.add_argument(
        "--process-id",
        type=int,
        default=int(env("JAX_PROCESS_ID", "-1")) if env("JAX_PROCESS_ID") else None,
        help="this process's index (env JAX_PROCESS_ID)",
    )


def init_distributed(args: argparse.Namespace) -> None:
    """Joins the JAX distributed runtime when a coordinator or process count is given.

    Must run before anything touches a device. On the CPU the cross-process collectives
    come from gloo (``jax_cpu_collectives_implementation``, the default since jax 0.5.1);
    on GPU and TPU from the platform. Unset values are auto-detected by JAX on SLURM,
    Open MPI, Kubernetes and Cloud TPU.
    """
    if args.coordinator_address is None and args.num_processes in (None, 1):
        return
    # Explicit, though gloo is the default: CPU processes need it to all-reduce.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )


def is_main_process() -> bool:
    return jax.process_index() == 0


# ------------------------------------------------------------------------------ data


def split_standardize(
    x: np.ndarray, y: np.ndarray, *, stratify: np.ndarray | None = None
) -> dict[str, Split]:
    """Fixed stratified 60/20/20 train/validation/test split, standardised with the
    mean and scale of the training split only."""
    strat = y if stratify is None else stratify
    x_train, x_rest, y_train, y_rest, _, s_rest = train_test_split(
        x, y, strat, test_size=0.4, random_state=SPLIT_SEED, stratify=strat
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=SPLIT_SEED, stratify=s_rest
    )
    scaler = StandardScaler().fit(x_train)
    f32 = lambda a: scaler.transform(a).astype(np.float32)  # noqa: E731
    return {
        "train": {"x": f32(x_train), "y": y_train},
        "val": {"x": f32(x_val), "y": y_val},
        "test": {"x": f32(x_test), "y": y_test},
    }


def shuffled_batches(
    n: int, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of ``(row indices, mask)`` batches, each exactly ``batch_size`` long.

    The last batch is padded (with row 0) and its mask is False there: no row is dropped,
    no new shape is compiled, and the loss's ``where=mask`` makes the padding count for
    nothing.
    """
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        mask = np.arange(batch_size) < len(idx)
        yield np.pad(idx, (0, batch_size - len(idx))), mask


# --------------------------------------------------------------------------- devices


class DataParallel:
    """A 1-D ``"data"`` mesh over ``jax.devices()`` (every process's devices)."""

    def __init__(self) -> None:
        self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.replicated = NamedSharding(self.mesh, P())
        self.num_devices = self.mesh.size

    def round_up(self, n: int) -> int:
        """``n`` rounded up to a multiple of the device count (a global batch size)."""
        return -(-n // self.num_devices) * self.num_devices

    def local_rows(self, batch_size: int) -> slice:
        """The rows of a global batch that land on this process's devices: one block,
        since ``jax.devices()`` lists each process's devices together."""
        index = self.batch_sharding.addressable_devices_indices_map((batch_size,))
        ranges = [idx[0].indices(batch_size) for idx in index.values()]
        rows = slice(min(r[0] for r in ranges), max(r[1] for r in ranges))
        if rows.stop - rows.start != sum(r[1] - r[0] for r in ranges):
            raise ValueError("this process's devices do not hold one block of the batch")
        return rows

    def put_batch(self, split: Split, idx: np.ndarray, mask: np.ndarray) -> dict[str, jax.Array]:
        """Assembles a global batch: this process reads only its own rows ``split[idx]``
        and contributes them; ``make_array_from_process_local_data`` stitches the
        processes' rows into one array sharded over the mesh."""
        rows = self.local_rows(len(idx))
        local = {name: arr[idx[rows]] for name, arr in split.items()}
        local["mask"] = mask[rows]
        return {
            name: jax.make_array_from_process_local_data(
                self.batch_sharding, arr, (len(idx),) + arr.shape[1:]
            )
            for name, arr in local.items()
        }

    def replicate(self, tree: Any) -> Any:
        """Places a pytree of arrays, identical on every process, on every device."""
        return jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(
                self.replicated, np.asarray(a), np.shape(a)
            ),
            tree,
        )

    def replicate_state(self, *nodes: Any) -> None:
        """Replicates the state of NNX modules / optimizers in place."""
        nnx.update(nodes, self.replicate(nnx.state(nodes)))


# -------------------------------------------------------------------------- the loop


def progress(iterable: Any, *, desc: str, quiet: bool) -> Any:
    """An epoch progress bar, off with ``--quiet``, off the main process or off a TTY."""
    disable = quiet or not is_main_process() or not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, unit="epoch", disable=disable, dynamic_ncols=True)


def evaluate(
    dp: DataParallel, eval_step: Callable, model: nnx.Module, split: Split
) -> tuple[float, np.ndarray]:
    """Mean loss and logits over a whole split in one padded batch.

    The split is padded up to a multiple of the device count; the mask keeps the
    padding out of the loss, and the padded logits are cut off. The logits are gathered
    from every process, so each process gets the full ``[n, ...]`` array.
    """
    n = len(split["y"])
    size = dp.round_up(n)
    idx = np.arange(size) % n
    loss, logits = eval_step(model, dp.put_batch(split, idx, np.arange(size) < n))
    logits = multihost_utils.process_allgather(logits, tiled=True)
    return float(loss), np.asarray(logits)[:n]


def probabilities(logits: np.ndarray) -> np.ndarray:
    """``sigmoid(logits)``; the prediction is exactly ``probabilities(logits) > 0.5``."""
    return np.asarray(jax.nn.sigmoid(logits))


def fit(
    config: TrainConfig,
    dp: DataParallel,
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    train_step: Callable,
    eval_step: Callable,
    train: Split,
    val: Split,
    *,
    metric: tuple[str, Callable[[np.ndarray, np.ndarray], float]],
    desc: str,
    max_steps: int | None = None,
) -> dict[str, list[float]]:
    """Trains for ``config.epochs`` epochs; returns the per-epoch history.

    ``metric`` is ``(name, fn(labels, logits))``, computed on the validation split after
    every epoch and shown in the progress bar with the losses. ``max_steps`` stops early
    (smoke tests).
    """
    name, metric_fn = metric
    rng = np.random.default_rng(config.seed)
    batch_size = dp.round_up(config.batch_size)
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": [], f"val_{name}": []}
    steps = 0
    bar = progress(range(config.epochs), desc=desc, quiet=config.quiet)
    for _ in bar:
        losses, counts = [], []
        for idx, mask in shuffled_batches(len(train["y"]), batch_size, rng):
            losses.append(train_step(model, optimizer, dp.put_batch(train, idx, mask)))
            counts.append(mask.sum())
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        val_loss, val_logits = evaluate(dp, eval_step, model, val)
        history["train_loss"].append(float(np.average(jax.device_get(losses), weights=counts)))
        history["val_loss"].append(val_loss)
        history[f"val_{name}"].append(float(metric_fn(val["y"], val_logits)))
        bar.set_postfix({key: f"{values[-1]:.4f}" for key, values in history.items()})
        if max_steps is not None and steps >= max_steps:
            break
    return history


# --------------------------------------------------------------------------- outputs


def binary_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Threshold metrics at ``sigmoid(logit) > 0.5`` and ranking metrics for binary labels.

    ROC-AUC and PR-AUC rank the logits, not the probabilities: the ranking is the same,
    but float32 ``sigmoid`` rounds every logit above about 17 to exactly 1.0 and ties them.
    """
    pred = probabilities(logits) > 0.5
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        labels, pred, average="binary", zero_division=0
    )
    return {
        "accuracy": float(skm.accuracy_score(labels, pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "roc_auc": float(skm.roc_auc_score(labels, logits)),
        "pr_auc": float(skm.average_precision_score(labels, logits)),
    }


def plot_losses(path: Path, histories: Mapping[str, Mapping[str, list[float]]]) -> None:
    """Training (solid) and validation (dashed) loss per epoch, one colour per run."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, h) in enumerate(histories.items()):
        epochs = np.arange(1, len(h["train_loss"]) + 1)
        prefix = f"{label}: " if label else ""
        ax.plot(epochs, h["train_loss"], color=f"C{i}", label=f"{prefix}train")
        ax.plot(epochs, h["val_loss"], color=f"C{i}", ls="--", label=f"{prefix}validation")
    ax.set(xlabel="epoch", ylabel="BCE loss (jaxbce)", yscale="log", title="Loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_roc_pr(out: Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """``roc.png`` and ``pr.png`` for ``{label: (binary labels, scores)}``."""
    fig_roc, roc = plt.subplots(figsize=(5, 5))
    fig_pr, pr = plt.subplots(figsize=(5, 5))
    for label, (y, score) in curves.items():
        fpr, tpr, _ = skm.roc_curve(y, score)
        roc.plot(fpr, tpr, label=f"{label} (AUC {skm.roc_auc_score(y, score):.3f})")
        precision, recall, _ = skm.precision_recall_curve(y, score)
        ap = skm.average_precision_score(y, score)
        pr.step(recall, precision, where="post", label=f"{label} (AP {ap:.3f})")
    roc.plot([0, 1], [0, 1], color="grey", lw=0.5)
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)")
    pr.set(xlabel="recall", ylabel="precision", title="Precision-recall (test)")
    for fig, ax, name in ((fig_roc, roc, "roc.png"), (fig_pr, pr, "pr.png")):
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


def write_outputs(
    out: str | None,
    metrics: Mapping[str, Any],
    histories: Mapping[str, Mapping[str, list[float]]],
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    config: TrainConfig,
    dp: DataParallel,
) -> None:
    """Writes ``metrics.json``, ``run.json`` (config, devices, history), ``loss.png``,
    ``roc.png`` and ``pr.png`` into ``out``; only process 0 writes."""
    if out is None or not is_main_process():
        return
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    run = {
        "config": dataclasses.asdict(config),
        "devices": dp.num_devices,
        "processes": jax.process_count(),
        "platform": jax.default_backend(),
        "history": histories,
    }
    (path / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    plot_losses(path / "loss.png", histories)
    plot_roc_pr(path, curves)


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """One ``key  value`` line per metric (lists printed inline)."""
    width = max(map(len, metrics))
    lines = []
    for key, value in metrics.items():
        if isinstance(value, list):
            text = "[" + ", ".join(f"{v:.4f}" for v in value) + "]"
        else:
            text = f"{value:.4f}"
        lines.append(f"  {key:<{width}}  {text}")
    return "\n".join(lines)


def report(title: str, metrics: Mapping[str, Any], out: str | None) -> None:
    """Prints the metrics and the files written to ``out`` (process 0 only)."""
    if not is_main_process():
        return
    print(f"{title}\n{format_metrics(metrics)}")
    if out is not None:
        files = ", ".join(sorted(p.name for p in Path(out).iterdir()))
        print(f"  wrote to {out}/: {files}")


def save_run(
    out: str | None,
    metrics: Mapping[str, Any],
    histories: Mapping[str, Mapping[str, list[float]]],
    config: TrainConfig,
    num_devices: int,
    **extra: Any,
) -> Path | None:
    """Writes ``metrics.json`` and ``run.json`` (config, devices, history and ``extra``)
    into ``out`` for a trainer that draws its own figures; returns the folder, or None
    when there is nothing to write (no ``out``, or not process 0)."""
    if out is None or not is_main_process():
        return None
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    run = {
        "config": dataclasses.asdict(config),
        "devices": num_devices,
        "processes": jax.process_count(),
        "platform": jax.default_backend(),
        "history": histories,
        **extra,
    }
    (path / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    return path
