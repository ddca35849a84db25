"""Generates tests/golden/focal_torchvision.npz: torchvision's sigmoid focal loss.

The test suite never imports torch; it reads the stored values. To regenerate (needs
torch and torchvision, CPU is enough; they need not import beside jaxbce)::

    python -m venv /tmp/tvenv
    /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy
    /tmp/tvenv/bin/python scripts/make_focal_golden.py

The script calls ``torchvision.ops.sigmoid_focal_loss`` itself (no re-implementation)
with ``reduction="none"``, on a fixed set of logits (a grid from 0 to +-1e4 and +-inf,
plus seeded random ones) and labels (0, 1, 0.3, 0.75), for every gamma in
``GAMMAS`` and alpha in ``ALPHAS`` (-1 is torchvision's "no alpha", None in jaxbce).
For each (gamma, alpha) pair it stores, as arrays of shape ``[n_pairs, n_points]``:

* ``loss64``, ``grad64``: loss and d loss / d logit in float64 (the reference where
  torchvision is finite);
* ``loss32``, ``grad32``: the same computed by torchvision in float32, to record where
  torchvision itself returns NaN or inf in the precision people train in.

torch is imported inside the functions only, so that pytest's ``--doctest-modules``
can collect this file without torch. Non-finite values are stored as they come
(NaN/inf): the test compares only where torchvision is finite and reports the rest.
"""

from __future__ import annotations

import pathlib

import numpy as np

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
ALPHAS = (-1.0, 0.25, 0.6)
LABELS = (0.0, 1.0, 0.3, 0.75)
OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "golden" / "focal_torchvision.npz"


def make_points() -> tuple[np.ndarray, np.ndarray]:
    grid = [0.0, 1e-6, 0.1, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 10.0, 12.0, 15.0, 16.12, 17.0]
    grid += [18.0, 20.0, 25.0, 30.0, 36.0, 37.0, 40.0, 50.0, 80.0, 100.0, 1e3, 1e4]
    grid = np.array(grid)
    rng = np.random.default_rng(20261122)
    rand = rng.normal(0.0, 6.0, 64)
    z = np.concatenate([grid, -grid[1:], [np.inf, -np.inf], rand])
    # float32-representable logits, so that float32 and float64 runs see the same input
    z = z.astype(np.float32).astype(np.float64)
    zz = np.tile(z, len(LABELS))
    yy = np.repeat(np.array(LABELS), len(z))
    return zz, yy


def focal(z: np.ndarray, y: np.ndarray, gamma: float, alpha: float, dtype):
    import torch
    from torchvision.ops import sigmoid_focal_loss

    zt = torch.tensor(z, dtype=dtype, requires_grad=True)
    yt = torch.tensor(y, dtype=dtype)
    loss = sigmoid_focal_loss(zt, yt, alpha=alpha, gamma=gamma, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), zt)
    return loss.detach().double().numpy(), grad.double().numpy()


def main() -> None:
    # imported here, so that collecting this file (pytest --doctest-modules) needs no torch
    import torch
    import torchvision

    z, y = make_points()
    pairs = [(g, a) for g in GAMMAS for a in ALPHAS]
    out = {k: [] for k in ("loss64", "grad64", "loss32", "grad32")}
    for g, a in pairs:
        for suffix, dtype in (("64", torch.float64), ("32", torch.float32)):
            loss, grad = focal(z, y, g, a, dtype)
            out["loss" + suffix].append(loss)
            out["grad" + suffix].append(grad)
    np.savez_compressed(
        OUT,
        logits=z,
        labels=y,
        gamma=np.array([g for g, _ in pairs]),
        alpha=np.array([a for _, a in pairs]),
        versions=np.array(f"torch {torch.__version__}, torchvision {torchvision.__version__}"),
        **{k: np.stack(v) for k, v in out.items()},
    )
    print(f"wrote {OUT} ({len(pairs)} (gamma, alpha) pairs x {z.size} points)")


if __name__ == "__main__":
    main()
