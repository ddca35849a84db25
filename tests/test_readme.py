"""The README's quickstart programs run as written and train."""

import pathlib
import re

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.standard_promotion

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def quickstart_blocks() -> list[str]:
    if not README.exists():
        pytest.skip("README.md is not next to the tests (installed-only layout)")
    section = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def quickstart():
    """The quickstart program, run once: its namespace and what it printed."""
    ns: dict = {}
    program = quickstart_blocks()[0]
    # user code with numpy-style broadcasting (x @ w + b) and optax's dtype promotion
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        exec(compile(program, "README.md", "exec"), ns)
    return ns


def test_quickstart_program_trains(quickstart):
    ns = quickstart
    init = {k: np.zeros_like(v) for k, v in ns["params"].items()}
    with jax.numpy_rank_promotion("allow"):
        first = float(ns["loss_fn"](init, ns["x"], ns["y"], ns["mask"]))
        last = float(ns["loss_fn"](ns["params"], ns["x"], ns["y"], ns["mask"]))
    # at zero logits every term is log 2: the masked mean of (1 - y) + pos_weight y
    y, mask, pw = ns["y"], ns["mask"], np.asarray(ns["pos_weight"])
    want = np.log(2) * np.sum(np.where(mask, 1 - y + pw * y, 0)) / mask.sum()
    assert first == pytest.approx(want, rel=1e-5)
    assert last < 0.5 * first, (first, last)


def test_nnx_snippet_trains(quickstart):
    ns = dict(quickstart)
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        exec(compile(quickstart_blocks()[1], "README.md", "exec"), ns)
        step = ns["nnx_train_step"]
        args = (ns["model"], ns["optimizer"], ns["x"], ns["y"], ns["mask"])
        losses = [float(step(*args)) for _ in range(200)]
    assert losses[-1] < 0.6 * losses[0], (losses[0], losses[-1])
