"""Generates ``torch_bce.npz``: PyTorch golden vectors for jaxbce's parity tests.

For every case it records the inputs, PyTorch's outputs and an exact reference:

* ``torch.nn.functional.binary_cross_entropy_with_logits`` (logits) and
  ``torch.nn.functional.binary_cross_entropy`` (probabilities, including p exactly 0
  and 1), in float32 and in float64;
* the loss and the vector-Jacobian products with respect to the logits/probabilities
  and the labels (PyTorch differentiates neither ``weight`` nor ``pos_weight``);
* ``weight`` of the full shape and of broadcast shapes, ``pos_weight`` of shape ``(C,)``
  and scalar-like (``()``, ``(1,)``); every reduction; shapes (7,), (4, 5), (2, 3, 4);
  hard and soft labels; logits up to |z| = 30;
* the points where PyTorch returns NaN (infinite logits), in their own ``f32_inf_*``
  cases, together with the true values.

The reference (``ref_*``) is evaluated with mpmath at 50 significant digits from the
exact inputs and rounded to float64; ``scale_*`` is the same sum with every term taken
in absolute value (the size of the terms, against which an error is measured where
the result itself cancels, e.g. the gradient of a soft label near z = logit(y)). The
script checks that PyTorch's float64 results agree with the reference before saving.

Key scheme (``np.load(path)[key]``):

``__meta__``
    JSON string: ``torch_version``, ``numpy_version``, ``mpmath_dps`` and ``cases``,
    a dict from case name to ``{"fn": "logits"|"probs", "dtype", "shape", "labels":
    "hard"|"soft", "reduction", "weight", "pos_weight", "note"}``.
``<case>/x``, ``<case>/y``
    Logits (``fn == "logits"``) or probabilities, and labels, in the case's dtype.
``<case>/weight``, ``<case>/pos_weight``
    Present only when the case uses them (case dtype, possibly broadcast shapes).
``<case>/cot``
    The cotangent applied to the loss (shape of the loss: per-element positive values
    for ``"none"``, the scalar 1 for ``"sum"`` and ``"mean"``).
``<case>/torch_<q>``, ``<case>/ref_<q>``, ``<case>/scale_<q>``
    For ``q`` in ``loss``, ``grad_x`` (d/dx of ``sum(cot * loss)``) and ``grad_y``
    (d/dy of the same): PyTorch's value in the case dtype, and the float64 reference
    and term size.

Regenerate (needs torch, CPU build is enough; the tests themselves never import torch)::

    pip install torch==2.13.0
    python scripts/make_golden.py
"""

from __future__ import annotations

import json
from pathlib import Path

import mpmath
import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "golden" / "torch_bce.npz"
DPS = 50
LOG_CLAMP = -100  # PyTorch's BCELoss clamps each log at -100 ...
PROB_EPS = 1e-12  # ... and divides its gradient by max(p (1 - p), 1e-12).

SHAPES = {"7": (7,), "4x5": (4, 5), "2x3x4": (2, 3, 4)}
# Broadcast (non-full) weight shapes per input shape, used in turn.
WEIGHT_BCAST = {"7": [(1,), ()], "4x5": [(5,), (4, 1)], "2x3x4": [(3, 4), (1, 4), (3, 1)]}
REDUCTIONS = ("none", "sum", "mean")


# --------------------------------------------------------------------------- inputs


def _logits(rng, shape, labels, dtype):
    z = rng.uniform(-30.0, 30.0, shape).astype(dtype).ravel()
    if labels == "hard":
        y = rng.integers(0, 2, z.shape).astype(dtype)
        # Where sigmoid(z) - y cancels (PyTorch's gradient) or (1 - y) z - log_sigmoid(z)
        # does (PyTorch's loss): the known points where jaxbce is the more accurate.
        special_z = [20.0, -30.0, 17.0, -17.0, 0.0, 30.0, -0.001]
        special_y = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    else:
        y = rng.uniform(0.0, 1.0, z.shape).astype(dtype)
        # Labels near 0 and 1, and logits at z = logit(y) where the gradient vanishes.
        special_y = [0.999, 0.001, 0.3, 0.7, 0.0, 1.0, 0.5]
        yy = np.array(special_y[:4], np.float64)
        special_z = list(np.log(yy / (1 - yy)).astype(dtype)) + [-25.0, 25.0, 30.0]
    k = min(len(special_z), z.size)
    z[:k] = np.asarray(special_z[:k], dtype)
    y[:k] = np.asarray(special_y[:k], dtype)
    return z.reshape(shape), y.reshape(shape)


def _probs(rng, shape, labels, dtype):
    p = rng.uniform(0.0, 1.0, shape).astype(dtype).ravel()
    if labels == "hard":
        y = rng.integers(0, 2, p.shape).astype(dtype)
    else:
        y = rng.uniform(0.0, 1.0, p.shape).astype(dtype)
    # p exactly 0 and 1 (clamped logs, gradient divided by 1e-12), near 0 and 1, and
    # p = y. Stay clear of p (1 - p) close to 1e-12, where float32 rounding of the
    # product could fall on either side of PyTorch's clamp.
    special_p = [0.0, 1.0, 0.0, 1.0, 1e-30, 1 - 2.0**-24, 1e-6]
    special_y = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    if labels == "soft":
        special_y = [0.3, 0.999, 0.001, 0.5, 0.7, 0.2, 1e-6]
    k = min(len(special_p), p.size)
    p[:k] = np.asarray(special_p[:k], dtype)
    y[:k] = np.asarray(special_y[:k], dtype)
    return p.reshape(shape), y.reshape(shape)


# ------------------------------------------------------------------------ reference


def _mp(x):
    return mpmath.mpf(float(x))


def _softplus(z):
    if mpmath.isinf(z):
        return z if z > 0 else mpmath.mpf(0)
    return mpmath.log1p(mpmath.exp(z))


def _sigmoid(z):
    if mpmath.isinf(z):
        return mpmath.mpf(1) if z > 0 else mpmath.mpf(0)
    return 1 / (1 + mpmath.exp(-z))


def _term(c, v):
    """``c * v`` with 0 * inf = 0 (a hard label's unused term is absent)."""
    return mpmath.mpf(0) if c == 0 else c * v


def _elementwise_logits(z, y, w, pw):
    """Per-element (loss, dloss/dz, dloss/dy) as lists of (value, term size) pairs."""
    a, b = 1 - y, pw * y
    sp_pos, sp_neg = _softplus(z), _softplus(-z)
    s_pos, s_neg = _sigmoid(z), _sigmoid(-z)
    t_loss = (_term(a, sp_pos), _term(b, sp_neg))
    t_gz = (a * s_pos, -b * s_neg)
    t_gy = (pw * sp_neg, -sp_pos)
    return [(w * (t[0] + t[1]), abs(w) * (abs(t[0]) + abs(t[1]))) for t in (t_loss, t_gz, t_gy)]


def _elementwise_probs(p, y, w):
    log_p = max(mpmath.log(p), LOG_CLAMP) if p > 0 else mpmath.mpf(LOG_CLAMP)
    log_q = max(mpmath.log1p(-p), LOG_CLAMP) if p < 1 else mpmath.mpf(LOG_CLAMP)
    t_loss = (-_term(y, log_p), -_term(1 - y, log_q))
    gp = (p - y) / max(p * (1 - p), mpmath.mpf(PROB_EPS))
    t_gy = (log_q, -log_p)
    return [
        (w * (t_loss[0] + t_loss[1]), abs(w) * (abs(t_loss[0]) + abs(t_loss[1]))),
        (w * gp, abs(w * gp)),
        (w * (t_gy[0] + t_gy[1]), abs(w) * (abs(t_gy[0]) + abs(t_gy[1]))),
    ]


def _reference(fn, x, y, weight, pos_weight, reduction, cot):
    shape = x.shape
    w = np.broadcast_to(1.0 if weight is None else weight, shape)
    pw = np.broadcast_to(1.0 if pos_weight is None else pos_weight, shape)
    n = x.size
    c = np.broadcast_to(cot, shape)
    vals = {q: np.empty(shape, object) for q in ("loss", "grad_x", "grad_y")}
    scales = {q: np.empty(shape, object) for q in vals}
    for idx in np.ndindex(shape):
        if fn == "logits":
            parts = _elementwise_logits(_mp(x[idx]), _mp(y[idx]), _mp(w[idx]), _mp(pw[idx]))
        else:
            parts = _elementwise_probs(_mp(x[idx]), _mp(y[idx]), _mp(w[idx]))
        # Gradients: d/dx of sum(cot * reduce(loss)); "mean" divides by n.
        ci = _mp(c[idx]) / (n if reduction == "mean" else 1)
        for q, (v, s) in zip(vals, parts, strict=True):
            if q == "loss":
                vals[q][idx], scales[q][idx] = v, s
            else:
                vals[q][idx], scales[q][idx] = ci * v, abs(ci) * s
    if reduction != "none":
        div = n if reduction == "mean" else 1
        vals["loss"] = np.array(mpmath.fsum(vals["loss"].ravel()) / div, object)
        scales["loss"] = np.array(mpmath.fsum(scales["loss"].ravel()) / div, object)

    def to64(a):
        return np.vectorize(float, otypes=[np.float64])(a).reshape(np.shape(a))

    return {q: to64(v) for q, v in vals.items()}, {q: to64(s) for q, s in scales.items()}


# ---------------------------------------------------------------------------- torch


def _torch_run(fn, x, y, weight, pos_weight, reduction, cot):
    import torch
    import torch.nn.functional as F  # noqa: N812

    tx = torch.tensor(x, requires_grad=True)
    ty = torch.tensor(y, requires_grad=True)
    kw = {"reduction": reduction}
    if weight is not None:
        kw["weight"] = torch.tensor(weight)
    if fn == "logits":
        if pos_weight is not None:
            kw["pos_weight"] = torch.tensor(pos_weight)
        out = F.binary_cross_entropy_with_logits(tx, ty, **kw)
    else:
        out = F.binary_cross_entropy(tx, ty, **kw)
    out.backward(torch.tensor(cot))
    return {
        "loss": out.detach().numpy(),
        "grad_x": tx.grad.numpy(),
        "grad_y": ty.grad.numpy(),
    }


# ---------------------------------------------------------------------------- cases


def _case_list():
    """(name, spec) for every case: a covering design, not the full product."""
    cases = []
    combos = [(wk, pk) for wk in ("none", "full", "bcast") for pk in ("none", "C", "scalar")]
    i = 0
    for dtype, dname in ((np.float32, "f32"), (np.float64, "f64")):
        shape_keys = SHAPES if dtype == np.float32 else {"4x5": (4, 5)}
        for skey, shape in shape_keys.items():
            for labels in ("hard", "soft"):
                for reduction in REDUCTIONS:
                    wk, pk = combos[i % len(combos)]
                    i += 1
                    for fn in ("logits", "probs"):
                        spec = {
                            "fn": fn,
                            "dtype": np.dtype(dtype).name,
                            "shape": list(shape),
                            "labels": labels,
                            "reduction": reduction,
                            "weight": wk,
                            "pos_weight": pk if fn == "logits" else "none",
                            "shape_key": skey,
                        }
                        name = f"{dname}_{fn}_{skey}_{labels}_{reduction}_w{wk}"
                        if fn == "logits":
                            name += f"_pw{pk}"
                        cases.append((name, spec))
    # PyTorch's NaN at infinite logits: every label at both infinities.
    for pk in ("none", "C"):
        spec = {
            "fn": "logits",
            "dtype": "float32",
            "shape": [6],
            "labels": "mixed",
            "reduction": "none",
            "weight": "none",
            "pos_weight": pk,
            "shape_key": "inf",
            "note": "PyTorch gives NaN at z=-inf for every label and at (z=+inf, y=1); "
            "the reference holds the true values: 0 at (+inf, 1) and (-inf, 0), "
            "+inf on the wrong side and for soft labels, finite gradients.",
        }
        cases.append((f"f32_inf_logits_pw{pk}", spec))
    return cases


def _weight_for(rng, spec, wbcast_counter):
    shape, skey = tuple(spec["shape"]), spec["shape_key"]
    dtype = np.dtype(spec["dtype"])
    wk = spec["weight"]
    if wk == "none":
        return None
    if wk == "full":
        wshape = shape
    else:
        options = WEIGHT_BCAST[skey]
        wshape = options[wbcast_counter % len(options)]
    w = rng.uniform(0.1, 3.0, wshape).astype(dtype)
    if w.ndim and w.size > 1:
        w.flat[-1] = 0.0  # a zero weight: exactly zero loss and gradient there
    return w


def _pos_weight_for(rng, spec, counter):
    pk, shape = spec["pos_weight"], tuple(spec["shape"])
    dtype = np.dtype(spec["dtype"])
    if pk == "none":
        return None
    if pk == "C":
        return rng.uniform(0.25, 4.0, shape[-1:]).astype(dtype)
    return rng.uniform(0.25, 4.0, [(), (1,)][counter % 2]).astype(dtype)


def build():
    import torch

    rng = np.random.default_rng(20261122)
    mpmath.mp.dps = DPS
    arrays, meta_cases = {}, {}
    for counter, (name, spec) in enumerate(_case_list()):
        dtype = np.dtype(spec["dtype"])
        shape = tuple(spec["shape"])
        if spec["shape_key"] == "inf":
            x = np.array([np.inf, np.inf, np.inf, -np.inf, -np.inf, -np.inf], dtype)
            y = np.array([0.0, 0.3, 1.0, 0.0, 0.3, 1.0], dtype)
        elif spec["fn"] == "logits":
            x, y = _logits(rng, shape, spec["labels"], dtype)
        else:
            x, y = _probs(rng, shape, spec["labels"], dtype)
        weight = _weight_for(rng, spec, counter)
        pos_weight = _pos_weight_for(rng, spec, counter)
        if spec["reduction"] == "none":
            cot = rng.uniform(0.5, 2.0, shape).astype(dtype)
        else:
            cot = np.array(1.0, dtype)

        got = _torch_run(spec["fn"], x, y, weight, pos_weight, spec["reduction"], cot)
        ref, scale = _reference(spec["fn"], x, y, weight, pos_weight, spec["reduction"], cot)
        if spec["shape_key"] != "inf":
            _check_torch64(spec, x, y, weight, pos_weight, cot, ref)

        arrays[f"{name}/x"], arrays[f"{name}/y"] = x, y
        if weight is not None:
            arrays[f"{name}/weight"] = weight
        if pos_weight is not None:
            arrays[f"{name}/pos_weight"] = pos_weight
        arrays[f"{name}/cot"] = cot
        for q in ("loss", "grad_x", "grad_y"):
            assert got[q].dtype == dtype and got[q].shape == ref[q].shape, (name, q)
            arrays[f"{name}/torch_{q}"] = got[q]
            arrays[f"{name}/ref_{q}"] = ref[q]
            arrays[f"{name}/scale_{q}"] = scale[q]
        spec = {k: v for k, v in spec.items() if k != "shape_key"}
        spec.setdefault("note", "")
        meta_cases[name] = spec

    meta = {
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "mpmath_version": mpmath.__version__,
        "mpmath_dps": DPS,
        "cases": meta_cases,
    }
    arrays["__meta__"] = np.array(json.dumps(meta, sort_keys=True))
    np.savez_compressed(OUT, **arrays)
    return OUT, len(meta_cases)


def _check_torch64(spec, x, y, weight, pos_weight, cot, ref):
    """Guards the reference's semantics: PyTorch in float64 on the same inputs agrees.

    PyTorch's own rounding (sigmoid(z) - y, (1 - y) z - log_sigmoid(z)) leaves absolute
    errors of order 1e-15 times the inputs' size, far below this check's tolerance; a
    semantic slip (a wrong mean divisor, a missing weight) is of order 1. The one known
    semantic difference is excluded: PyTorch's label gradient of BCELoss at p = 0 or 1
    is +-inf (the unclamped log), while the clamped loss has slope +-100 there. The
    tolerance allows for PyTorch's clamp of p (1 - p) being float32(1e-12) even in
    float64 (a relative difference of 4e-9 at p = 0 and 1).
    """
    up = [None if a is None else np.asarray(a, np.float64) for a in (weight, pos_weight)]
    t64 = _torch_run(
        spec["fn"],
        np.asarray(x, np.float64),
        np.asarray(y, np.float64),
        up[0],
        up[1],
        spec["reduction"],
        np.asarray(cot, np.float64),
    )
    for q, r in ref.items():
        t = t64[q]
        keep = np.isfinite(t) | ~np.isfinite(r)
        if q == "grad_y" and spec["fn"] == "probs":
            keep &= (x > 0) & (x < 1)
        atol = 1e-9 * max(1.0, float(np.max(np.abs(r[np.isfinite(r)]), initial=0.0)))
        np.testing.assert_allclose(t[keep], r[keep], rtol=1e-8, atol=atol, err_msg=q)


if __name__ == "__main__":
    path, n = build()
    print(f"wrote {path} ({path.stat().st_size} bytes, {n} cases)")
