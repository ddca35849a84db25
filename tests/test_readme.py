"""The README's quickstart runs as written and trains."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.standard_promotion

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def quickstart_source() -> str:
    if not README.exists():
        pytest.skip("README.md is not next to the tests (installed-only layout)")
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_train_step_learns():
    ns: dict = {}
    exec(compile(quickstart_source(), "README.md", "exec"), ns)
    r = np.random.default_rng(0)
    x = r.standard_normal((128, 4)).astype(np.float32)
    y = (x @ r.standard_normal((4, 3)) > 0).astype(np.float32)
    mask = r.uniform(size=y.shape) > 0.2
    pos_weight = ns["jaxbce"].pos_weight_from_labels(y, where=mask)
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    opt_state = ns["opt"].init(params)
    losses = []
    # user code with the default numpy-style broadcasting (x @ w + b)
    with jax.numpy_rank_promotion("allow"):
        for _ in range(300):
            params, opt_state, loss = ns["train_step"](params, opt_state, x, y, mask, pos_weight)
            losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
