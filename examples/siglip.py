"""Image-text pairs: a two-tower Flax NNX model trained with ``jaxbce.siglip_loss``.

Data: scikit-learn's bundled digits (1797 8x8 images), each paired with a short
"caption" of its digit made of attribute words: its name and whether it is even or
odd, prime, small (0-4) or large, drawn with a closed loop or open, e.g. ``"seven odd
prime large open"``. Training captions are redrawn every epoch as random subsets of
those words in random order (the name only half the time). An image tower (MLP on the
pixels) and a text tower (a learned embedding table, mean-pooled over the words, and
an MLP) map both to unit vectors; SigLIP's sigmoid loss scores every image against
every caption of the batch, with a learned temperature ``t = exp(t')`` and bias.

Evaluation is zero-shot: each test image is scored against the full captions of the
ten digits and classified by the best one, without any digit label in training.
Retrieval recall@1 on the test pairs counts a hit when the best caption (for an image)
or image (for a caption) is one the caption truly describes.

The loss runs as a ring over every device (``shard_map`` + ``ppermute``): each device
embeds its rows of the batch and never holds the batch's ``[B, B]`` logits.

    python examples/siglip.py --out out/siglip
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/siglip.py
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import trainlib
from flax import nnx
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits

import jaxbce

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Each attribute: (word when true, word when false, the digits it is true of).
ATTRIBUTES = (
    ("even", "odd", (0, 2, 4, 6, 8)),
    ("prime", "composite", (2, 3, 5, 7)),
    ("small", "large", (0, 1, 2, 3, 4)),
    ("loop", "open", (0, 6, 8, 9)),  # as handwritten here, 4 is mostly open
)
PAD = 0
VOCAB = ("<pad>", *NAMES, *(w for a in ATTRIBUTES for w in a[:2]))
TOKEN = {word: i for i, word in enumerate(VOCAB)}
CAPTION_LENGTH = 1 + len(ATTRIBUTES)


@dataclasses.dataclass(frozen=True)
class Config(trainlib.TrainConfig):
    epochs: int = 40
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    embed_dim: int = 64
    hidden: int = 256
    name_probability: float = 0.5  # chance that a training caption names its digit
    word_probability: float = 0.7  # chance that it keeps each attribute word


# ------------------------------------------------------------------------ captions


def words_of(digit: int) -> list[str]:
    """The full caption of a digit: its name, then one word per attribute."""
    return [NAMES[digit]] + [yes if digit in true else no for yes, no, true in ATTRIBUTES]


def encode(words: Sequence[str]) -> np.ndarray:
    tokens = np.full(CAPTION_LENGTH, PAD, np.int32)
    tokens[: len(words)] = [TOKEN[w] for w in words]
    return tokens


def prompts() -> np.ndarray:
    """``[10, L]``: the full caption of every digit, for zero-shot classification."""
    return np.stack([encode(words_of(d)) for d in range(10)])


def sample_captions(
    digits: np.ndarray, rng: np.random.Generator, name_p: float, word_p: float
) -> np.ndarray:
    """``[n, L]`` tokens: a random subset of each digit's words in random order (never
    empty)."""
    out = np.empty((len(digits), CAPTION_LENGTH), np.int32)
    for i, d in enumerate(digits):
        words = words_of(int(d))
        keep = rng.random(len(words)) < np.r_[name_p, np.full(len(words) - 1, word_p)]
        if not keep.any():
            keep[rng.integers(len(words))] = True
        chosen = [w for w, k in zip(words, keep, strict=True) if k]
        out[i] = encode(rng.permutation(chosen).tolist())
    return out


def describes(tokens: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """``[captions, images]`` bool: every word of caption ``i`` is true of digit ``j``."""
    truth = np.zeros((len(VOCAB), 10), bool)
    truth[PAD] = True
    for d in range(10):
        truth[[TOKEN[w] for w in words_of(d)], d] = True
    return truth[tokens][:, :, digits].all(axis=1)


def load_data() -> dict[str, trainlib.Split]:
    """Standardised pixels ``x`` and digits ``y``, fixed 60/20/20 split; the
    validation and test captions are drawn once (seed 0)."""
    x, digit = load_digits(return_X_y=True)
    data = trainlib.split_standardize(x, digit)
    rng = np.random.default_rng(trainlib.SPLIT_SEED)
    for name in ("val", "test"):
        data[name]["tokens"] = sample_captions(data[name]["y"], rng, 0.5, 0.7)
    return data


# --------------------------------------------------------------------------- model


class TwoTower(nnx.Module):
    """Pixels ``[B, 64]`` and captions ``[B, L]`` -> unit embeddings ``[B, D]`` each,
    plus SigLIP's temperature ``exp(t')`` and bias (initialized to 10 and -10, as in
    the paper)."""

    def __init__(self, pixels: int, config: Config, *, rngs: nnx.Rngs):
        h, d = config.hidden, config.embed_dim
        self.image = nnx.Sequential(
            nnx.Linear(pixels, h, rngs=rngs),
            nnx.relu,
            nnx.Linear(h, h, rngs=rngs),
            nnx.relu,
            nnx.Linear(h, d, rngs=rngs),
        )
        self.words = nnx.Embed(len(VOCAB), d, rngs=rngs)
        self.text = nnx.Sequential(
            nnx.Linear(d, h, rngs=rngs), nnx.relu, nnx.Linear(h, d, rngs=rngs)
        )
        self.log_scale = nnx.Param(jnp.asarray(np.log(10.0), jnp.float32))
        self.bias = nnx.Param(jnp.asarray(-10.0, jnp.float32))

    def embed_images(self, pixels: jax.Array) -> jax.Array:
        return _unit(self.image(pixels))

    def embed_texts(self, tokens: jax.Array) -> jax.Array:
        """Mean of the caption's word embeddings (padding excluded), then an MLP."""
        mask = (tokens != PAD)[..., None].astype(jnp.float32)
        pooled = jnp.sum(self.words(tokens) * mask, axis=1) / jnp.sum(mask, axis=1)
        return _unit(self.text(pooled))


def _unit(z: jax.Array) -> jax.Array:
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)


def loss_fn(model: TwoTower, batch: dict[str, jax.Array], mesh) -> jax.Array:
    """SigLIP's loss over every image-caption pair of the (global) batch, as a ring
    over the mesh's ``"data"`` axis: each device holds its rows of both embeddings."""
    ring = jax.shard_map(
        functools.partial(jaxbce.siglip_loss, axis_name="data"),
        mesh=mesh,
        in_specs=(P("data"), P("data"), P(), P()),
        out_specs=P(),
    )
    x = model.embed_images(batch["x"])
    y = model.embed_texts(batch["tokens"])
    return ring(x, y, jnp.exp(model.log_scale[...]), model.bias[...])


@functools.partial(nnx.jit, static_argnames="mesh")
def train_step(model: TwoTower, optimizer: nnx.Optimizer, batch, mesh) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch, mesh)
    optimizer.update(model, grads)
    return loss


@functools.partial(nnx.jit, static_argnames="mesh")
def eval_step(model: TwoTower, batch, mesh) -> jax.Array:
    return loss_fn(model, batch, mesh)


@nnx.jit
def similarities(model: TwoTower, pixels: jax.Array, tokens: jax.Array) -> jax.Array:
    """``[images, captions]`` cosine similarities (the logits up to scale and bias)."""
    return model.embed_images(pixels) @ model.embed_texts(tokens).T


# ---------------------------------------------------------------------- evaluation


def cosines(dp: trainlib.DataParallel, model: TwoTower, pixels, tokens) -> np.ndarray:
    """The similarities of a whole split, computed replicated and read on this process."""
    out = similarities(model, *dp.replicate((pixels, tokens)))
    return np.asarray(out.addressable_data(0))


def zero_shot_accuracy(dp, model, split: trainlib.Split) -> tuple[float, np.ndarray]:
    """Accuracy of ``argmax`` over the ten digits' captions, and the similarities."""
    sim = cosines(dp, model, split["x"], prompts())
    return float(np.mean(sim.argmax(axis=1) == split["y"])), sim


def retrieval_recall(dp, model, split: trainlib.Split) -> dict[str, float]:
    """Recall@1 between the split's images and its captions, a hit being a caption
    that truly describes the image's digit."""
    sim = cosines(dp, model, split["x"], split["tokens"])
    true = describes(split["tokens"], split["y"])  # [captions, images]
    images = np.arange(len(split["y"]))
    return {
        "image_to_text_recall_at_1": float(np.mean(true[sim.argmax(axis=1), images])),
        "text_to_image_recall_at_1": float(np.mean(true[images, sim.argmax(axis=0)])),
    }


def plot(path: Path, history: dict[str, list[float]], sim: np.ndarray, digits: np.ndarray):
    """Validation zero-shot accuracy per epoch, and the mean test similarity of each
    digit's images to each digit's caption."""
    fig, (ax_acc, ax_sim) = trainlib.plt.subplots(1, 2, figsize=(11, 4.2))
    acc = history["val_zero_shot_accuracy"]
    ax_acc.plot(np.arange(1, len(acc) + 1), acc, "-o", ms=3)
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title="Zero-shot (validation)")
    ax_acc.grid(alpha=0.3)
    mean = np.stack([sim[digits == d].mean(axis=0) for d in range(10)])
    im = ax_sim.imshow(mean, cmap="viridis")
    ax_sim.set(xlabel="caption of digit", ylabel="test images of digit", xticks=range(10))
    ax_sim.set(yticks=range(10), title="Mean cosine similarity (test)")
    fig.colorbar(im, ax=ax_sim, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    trainlib.plt.close(fig)


def validation_loss(dp, model, split: trainlib.Split, batch_size: int) -> float:
    """The mean loss over the split's full batches, in order (the loss of a batch
    grows with its size: compared with training only at the same batch size)."""
    starts = range(0, len(split["y"]) - batch_size + 1, batch_size)
    full = np.ones(batch_size, bool)
    batches = [dp.put_batch(split, np.arange(i, i + batch_size), full) for i in starts]
    return float(np.mean([eval_step(model, batch, dp.mesh) for batch in batches]))


# --------------------------------------------------------------------------- main


def train_and_evaluate(config: Config, *, max_steps: int | None = None) -> dict:
    dp = trainlib.DataParallel()
    data = load_data()
    train, val, test = data["train"], data["val"], data["test"]
    model = TwoTower(train["x"].shape[1], config, rngs=nnx.Rngs(config.seed))
    tx = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    dp.replicate_state(model, optimizer)

    rng = np.random.default_rng(config.seed)
    batch_size = dp.round_up(config.batch_size)
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
    history["val_zero_shot_accuracy"] = []
    steps = 0
    for _ in trainlib.progress(range(config.epochs), desc="siglip", quiet=config.quiet):
        captions = sample_captions(
            train["y"], rng, config.name_probability, config.word_probability
        )
        split = dict(train, tokens=captions)
        losses = []
        for idx, mask in trainlib.shuffled_batches(len(train["y"]), batch_size, rng):
            if not mask.all():  # every pair of a batch is scored: no padding rows
                continue
            losses.append(train_step(model, optimizer, dp.put_batch(split, idx, mask), dp.mesh))
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        history["train_loss"].append(float(np.mean(jax.device_get(losses))))
        history["val_loss"].append(validation_loss(dp, model, val, batch_size))
        history["val_zero_shot_accuracy"].append(zero_shot_accuracy(dp, model, val)[0])
        if max_steps is not None and steps >= max_steps:
            break

    accuracy, sim = zero_shot_accuracy(dp, model, test)
    metrics = {
        "zero_shot_accuracy": accuracy,
        **retrieval_recall(dp, model, test),
        "scale": float(np.exp(jax.device_get(model.log_scale[...]))),
        "bias": float(jax.device_get(model.bias[...])),
        "devices": dp.num_devices,
    }
    # one-vs-rest: how well each digit's caption ranks that digit's images first
    curves = {"all digits": ((test["y"][:, None] == np.arange(10)).ravel(), sim.ravel())}
    curves |= {f"{d} {NAMES[d]}": (test["y"] == d, sim[:, d]) for d in range(10)}
    trainlib.write_outputs(config.out, metrics, {"": history}, curves, config, dp)
    if config.out is not None and trainlib.is_main_process():
        plot(Path(config.out) / "siglip.png", history, sim, test["y"])
    return metrics


def main(argv: Sequence[str] | None = None) -> dict:
    config = trainlib.parse_config(Config, __doc__, argv)
    metrics = train_and_evaluate(config)
    trainlib.report("Digits and captions (SigLIP, zero-shot)", metrics, config.out)
    return metrics


if __name__ == "__main__":
    main()
