"""Accuracy of jaxbce's sigmoid BCE against a high-precision reference.

float32 inputs are checked against a float64 reference (``_ref_*``). That is provably
enough: the float32 inputs are exact in float64, the reference's loss is a sum of
non-negative terms (``max(z, 0) + log1p(exp(-|z|))`` and its mirror), and its gradient
forms each sigmoid from one ``exp(-|z|)`` without cancellation, so its relative error
(resp. its error relative to the size of the gradient's two terms) is a few float64 eps,
about 1e-9 of a float32 ulp. ``test_float64_reference_agrees_with_mpmath`` checks this
on a sample against mpmath at 40 digits; float64 logits are checked against mpmath.

``ulp = |got - true| / spacing(float32(true))``, counted in the normal range only
(|true| >= 1.18e-38; XLA on CPU flushes float32 subnormals to zero). A soft label's
gradient vanishes at z = logit(y), so its error is measured in float32 eps times the
size of its two terms, ``(1 - y) sigmoid(z) + pos_weight y sigmoid(-z)``.

Measured with jax 0.10.2 on CPU (2026-11) on this module's fixed sample: 4000 logits
log-uniform over +-[1e-8, 3e38] plus 97 in [80, 104] (loss), 4000 over +-[1e-6, 100]
(gradient); asserted bounds in brackets:

* loss, y in {0, 1}: 2.42 ulp; y in {0.3, 0.999}: 2.53 ulp                   [3 ulp]
* loss with pos_weight 0.5 or 3.0: 2.57 ulp                                   [3 ulp]
* gradient, y in {0, 1}: 1.96 ulp; with pos_weight: 2.22 ulp                 [3 ulp]
* gradient, soft labels: 1.25 eps of its terms; with pos_weight: 1.91        [3 eps]
* float64 logits vs mpmath: loss 1.79 ulp, hard-label gradient 2.52 ulp,
  soft-label gradient 1.26 eps of its terms                                  [3]
* BCELoss on float32 probabilities: loss 1.46 ulp, gradient 1.73 ulp         [3 ulp]
* bfloat16 and float16 logits: loss and gradient within 0.500 ulp of their dtype.

The 3 ulp bound is a property of this sample, not of every input: XLA's ``exp`` and
``log1p`` leave up to about 2.7 ulp, and 200,000 logits per label reach 3.31 ulp for
the loss (z = 0.6552587, y = 0.999, pos_weight 0.5) and 2.94 ulp for the hard-label
gradient (z = 5.9526043, y = 1, pos_weight 3).

With pos_weight, an entry counts only where the unweighted value is normal too: with
pos_weight > 1 and y = 1, at z in about [87.3, 88.7], the true loss and gradient
(3 sigmoid(-z), 1.2e-38 to 3.4e-38) are normal but sigmoid(-z) itself is subnormal,
and XLA on CPU flushes it to zero before the weight multiplies it (jaxbce returns 0
there, as any float32 formula that weights after the exp does).
"""

from __future__ import annotations

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbce
from jaxbce import _core
from jaxbce import _elementwise as ew

SEED = 20261122
N = 4000
F32 = np.finfo(np.float32)
MAX_ULP = 3.0
MAX_EPS = 3.0
HARD = (0.0, 1.0)
SOFT = (0.3, 0.999)


# ------------------------------------------------------------------------ helpers


def _log_uniform(rng, lo, hi, n, dtype=np.float32):
    """``n`` values with magnitude log-uniform in [lo, hi] and random sign."""
    mag = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    sign = np.where(rng.uniform(size=n) < 0.5, -1.0, 1.0)
    return (sign * mag).astype(dtype)


def _logits(lo, hi, seed_offset=0, dtype=np.float32):
    return _log_uniform(np.random.default_rng(SEED + seed_offset), lo, hi, N, dtype)


_ulp = reference.ulp
_normal = reference.normal
_ref_loss = reference.bce
_ref_grad = reference.bce_grad


@functools.cache
def _loss_and_grad_fns():
    @jax.jit
    def loss(z, y, pw):
        return jaxbce.binary_cross_entropy_with_logits(z, y, pos_weight=pw, reduction="none")

    @jax.jit
    def grad(z, y, pw):
        return jax.grad(lambda z: jnp.sum(loss(z, y, pw)))(z)

    @jax.jit
    def vjp(z, y, pw):
        out, f = jax.vjp(lambda z: loss(z, y, pw), z)
        return f(jnp.ones_like(out))[0]

    def eager(z, y, pw):
        # no jit anywhere: op-by-op dispatch, where XLA cannot fuse multiply-adds
        return jax.grad(
            lambda z: jaxbce.binary_cross_entropy_with_logits(z, y, pos_weight=pw, reduction="sum")
        )(z)

    return loss, grad, vjp, eager


def _jaxbce(z, y, pw=None, what="loss"):
    """jaxbce's per-element loss or gradient for logits ``z`` and a scalar label ``y``."""
    fns = dict(zip(("loss", "grad", "vjp", "eager"), _loss_and_grad_fns(), strict=True))
    yy = jnp.full(np.shape(z), y, jnp.float32)
    pw = None if pw is None else jnp.full(np.shape(z), pw, jnp.float32)
    return np.asarray(fns[what](jnp.asarray(z), yy, pw), np.float64)


def _normal_ulp(got, true, unweighted=None):
    """ulp of each entry where ``true`` (and ``unweighted``, the same quantity without
    pos_weight) is in float32's normal range, else 0; the count."""
    ok = _normal(true) if unweighted is None else _normal(true) & _normal(unweighted)
    ulp = np.zeros(np.shape(true))
    ulp[ok] = _ulp(np.asarray(got)[ok], true[ok])
    return ulp, int(ok.sum())


def _loss_errors(z, y, pw=None):
    """jaxbce's loss, its ulp where normal (else 0), the count, and the reference."""
    true = _ref_loss(z, np.float32(y), 1.0 if pw is None else pw)
    got = _jaxbce(z, np.float32(y), pw)
    unweighted = None if pw is None else _ref_loss(z, np.float32(y), 1.0)
    return (got, *_normal_ulp(got, true, unweighted), true)


def _grad_errors(z, y, pw=None, what="grad"):
    """ulp of the gradient where normal (else 0), the count, and the error in eps of the
    size of its two terms."""
    true, size = _ref_grad(z, np.float32(y), 1.0 if pw is None else pw)
    got = _jaxbce(z, np.float32(y), pw, what)
    unweighted = None if pw is None else _ref_grad(z, np.float32(y), 1.0)[0]
    return (*_normal_ulp(got, true, unweighted), np.abs(got - true) / (F32.eps * size))


# Plus a sweep across the bottom of float32's normal range (sigmoid(-z) ~ 1e-38).
Z_LOSS = np.concatenate([_logits(1e-8, 3e38), np.linspace(80.0, 104.0, 97, dtype=np.float32)])
Z_GRAD = _logits(1e-6, 100.0, seed_offset=1)


def _worst(err, z):
    i = int(np.argmax(err))
    return f"max {err[i]:.3f} at z={float(z[i])!r}"


# ------------------------------------------------------------ reference validation


def test_float64_reference_agrees_with_mpmath():
    z = np.concatenate([Z_LOSS[:150], Z_GRAD[:150], np.float32([0.0, 1e-8, -88.0, 88.0])])
    for y, pw in ((0.0, 1.0), (1.0, 1.0), (0.3, 1.0), (0.999, 3.0)):
        y = np.float32(y)
        loss, (grad, size) = _ref_loss(z, y, pw), _ref_grad(z, y, pw)
        for i, zi in enumerate(z):
            want_loss, want_grad, _ = reference.bce_mpmath(zi, y, pw)
            # Below float64's range the reference is 0 (only compared where float32 is normal).
            assert abs(loss[i] - want_loss) <= 1e-14 * want_loss + 1e-300, (zi, y)
            assert abs(grad[i] - want_grad) <= 1e-14 * size[i] + 1e-300, (zi, y)


# ------------------------------------------------------------------- float32 loss


@pytest.mark.parametrize("y", HARD + SOFT)
def test_loss_within_3_ulp(y):
    _, ulp, count, _ = _loss_errors(Z_LOSS, y)
    assert count > 0.5 * N
    assert ulp.max() <= MAX_ULP, _worst(ulp, Z_LOSS)


@pytest.mark.parametrize("pw", [0.5, 3.0])
@pytest.mark.parametrize("y", HARD + SOFT)
def test_loss_with_pos_weight_within_3_ulp(y, pw):
    got, ulp, _, true = _loss_errors(Z_LOSS, y, pw)
    assert ulp.max() <= MAX_ULP, _worst(ulp, Z_LOSS)
    # Beyond float32's range (pos_weight 3 at z = -3e38) the right answer is +inf.
    np.testing.assert_array_equal(got[true > F32.max], np.inf)


# --------------------------------------------------------------- float32 gradient


@pytest.mark.parametrize("what", ["grad", "vjp", "eager"])
@pytest.mark.parametrize("pw", [None, 0.5, 3.0])
@pytest.mark.parametrize("y", HARD)
def test_hard_label_gradient_within_3_ulp(y, pw, what):
    ulp, count, _ = _grad_errors(Z_GRAD, y, pw, what)
    assert count > 0.9 * N
    assert ulp.max() <= MAX_ULP, _worst(ulp, Z_GRAD)


@pytest.mark.parametrize("what", ["grad", "vjp", "eager"])
@pytest.mark.parametrize("pw", [None, 0.5, 3.0])
@pytest.mark.parametrize("y", SOFT)
def test_soft_label_gradient_within_3_eps_of_its_terms(y, pw, what):
    _, _, err = _grad_errors(Z_GRAD, y, pw, what)
    assert err.max() <= MAX_EPS, _worst(err, Z_GRAD)


def test_soft_label_gradient_is_tested_where_it_cancels():
    """The sample reaches z near logit(y), where the gradient is far below its terms."""
    true, size = _ref_grad(Z_GRAD, np.float32(0.3))
    assert np.min(np.abs(true) / size) < 1e-3


# ------------------------------------------------------------------ extreme values

EXTREME_Z = np.float32([1e9, -1e9, 3e38, -3e38, np.inf, -np.inf, 0.0, 1e-45, -1e-45, 1e-38, -1e-38])


@pytest.mark.parametrize("y", [0.0, 1.0, 0.3])
def test_extreme_logits_give_the_true_loss_and_gradient(y):
    z = EXTREME_Z
    y32 = np.float32(y)
    loss, grad = _jaxbce(z, y32), _jaxbce(z, y32, what="grad")
    true_loss = _ref_loss(z, y32)
    true_grad, _ = _ref_grad(z, y32)

    # inf exactly where the true loss is inf, 0 exactly at (+inf, 1) and (-inf, 0).
    inf = (z == np.inf) & (y != 1.0) | (z == -np.inf) & (y != 0.0)
    zero = (z == np.inf) & (y == 1.0) | (z == -np.inf) & (y == 0.0)
    np.testing.assert_array_equal(np.isinf(true_loss), inf)
    np.testing.assert_array_equal(loss[inf], np.inf)
    np.testing.assert_array_equal(loss[zero], 0.0)
    finite = np.isfinite(true_loss) & ~zero
    assert np.all(_ulp(loss[finite], true_loss[finite]) <= MAX_ULP), (loss, true_loss)

    # The gradient is finite everywhere and true: at +-inf it is 1 - y or -y.
    assert np.all(np.isfinite(grad))
    ok = _normal(true_grad)
    assert np.all(_ulp(grad[ok], true_grad[ok]) <= MAX_ULP), (grad, true_grad)
    assert np.all(np.abs(grad[~ok]) <= F32.tiny), (grad, true_grad)


@pytest.mark.parametrize("pw", [None, 3.0])
@pytest.mark.parametrize("y", [0.0, 1.0, 0.3])
def test_nan_logits_give_nan_loss(y, pw):
    z = np.float32([np.nan, 0.0, np.nan])
    loss = _jaxbce(z, np.float32(y), pw)
    np.testing.assert_array_equal(np.isnan(loss), [True, False, True])


_finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
_unit_f32 = st.floats(0.0, 1.0, width=32)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    z=hnp.arrays(np.float32, (8,), elements=_finite_f32),
    y=hnp.arrays(np.float32, (8,), elements=_unit_f32),
)
def test_finite_input_gives_finite_nonnegative_loss_and_finite_gradient(z, y):
    loss_fn, _, vjp_fn, _ = _loss_and_grad_fns()
    loss = np.asarray(loss_fn(z, y, None))
    grad = np.asarray(vjp_fn(z, y, None))
    assert np.all(np.isfinite(loss)) and np.all(loss >= 0), (z, y, loss)
    assert np.all(np.isfinite(grad)), (z, y, grad)


# --------------------------------------------------------- float16 and bfloat16


@pytest.mark.parametrize(
    "dtype, lo, hi",
    [(jnp.bfloat16, 1e-8, 3e38), (jnp.float16, 1e-7, 6e4)],
    ids=["bfloat16", "float16"],
)
@pytest.mark.parametrize("y", [0.0, 1.0, 0.3])
def test_low_precision_logits_round_the_float32_result(dtype, lo, hi, y):
    """Computed in float32, rounded once: within half a ulp of ``dtype`` (+ 3 float32 ulp)."""
    z = _logits(lo, hi, seed_offset=2).astype(dtype)
    y32 = np.float32(y)
    labels = jnp.full(z.shape, y32)

    def loss_fn(z):
        return jaxbce.binary_cross_entropy_with_logits(z, labels, reduction="none")

    loss, vjp = jax.jit(lambda z: jax.vjp(loss_fn, z))(jnp.asarray(z))
    (grad,) = jax.jit(vjp)(jnp.ones_like(loss))
    assert loss.dtype == dtype and grad.dtype == dtype

    z64 = np.asarray(z, np.float64)
    info = jnp.finfo(dtype)
    for got, true in ((loss, _ref_loss(z64, y32)), (grad, _ref_grad(z64, y32)[0])):
        got = np.asarray(got, np.float64)
        big = np.maximum(np.abs(got), np.abs(true))
        bound = 0.5 * np.spacing(big.astype(dtype)).astype(np.float64)
        bound += MAX_ULP * np.spacing(np.abs(true).astype(np.float32)).astype(np.float64)
        # Below the smallest float16 subnormal, or below bfloat16's (= float32's) normal
        # range which XLA flushes, the right answer is 0 or the smallest number.
        floor = float(info.smallest_subnormal if dtype == jnp.float16 else info.tiny)
        ok = np.abs(true) >= floor
        assert np.all(np.abs(got - true)[ok] <= bound[ok]), _worst(
            np.where(ok, np.abs(got - true) / bound, 0.0), z64
        )
        assert np.all(np.abs(got[~ok]) <= floor)


# ------------------------------------------------------------------ float64 logits

N64 = 600


@functools.cache
def _float64_errors(y):
    """jaxbce on float64 logits vs mpmath (40 digits): ulp of the loss and the gradient,
    and the gradient's error in float64 eps of its terms' size, as exact as mpmath's.

    Logits: log-uniform over +-[1e-8, 1e300] (loss) and +-[1e-6, 700] (gradient).
    """
    rng = np.random.default_rng(SEED + 3)
    z = np.concatenate(
        [
            _log_uniform(rng, 1e-8, 1e300, N64, np.float64),
            _log_uniform(rng, 1e-6, 700.0, N64, np.float64),
        ]
    )
    with jax.enable_x64(True):
        zz, yy = jnp.asarray(z), jnp.full(z.shape, y, jnp.float64)
        loss, vjp = jax.vjp(
            lambda z: jaxbce.binary_cross_entropy_with_logits(z, yy, reduction="none"), zz
        )
        (grad,) = vjp(jnp.ones_like(loss))
        assert loss.dtype == grad.dtype == jnp.float64
    info = np.finfo(np.float64)
    loss_ulp, grad_ulp, grad_eps = [], [], []
    for zi, li, gi in zip(z, np.asarray(loss), np.asarray(grad), strict=True):
        true_loss, true_grad, size = reference.bce_mpmath(zi, y)
        for true, got, out in ((true_loss, li, loss_ulp), (true_grad, gi, grad_ulp)):
            if info.tiny <= abs(true) <= info.max:
                out.append(float(abs(got - true) / np.spacing(abs(float(true)))))
        if size >= info.tiny:
            grad_eps.append(float(abs(gi - true_grad) / (info.eps * size)))
    return np.array(loss_ulp), np.array(grad_ulp), np.array(grad_eps)


@pytest.mark.parametrize("y", [0.0, 1.0, 0.3])
def test_float64_logits_within_3_ulp_of_mpmath(y):
    loss_ulp, grad_ulp, grad_eps = _float64_errors(y)
    assert loss_ulp.size > N64 and grad_ulp.size > N64 // 2
    assert loss_ulp.max() <= MAX_ULP
    if y in HARD:
        assert grad_ulp.max() <= MAX_ULP
    else:
        assert grad_eps.max() <= MAX_EPS


# -------------------------------------------------------- BCELoss on probabilities


def _probs():
    rng = np.random.default_rng(SEED + 4)
    n = N // 4
    return np.concatenate(
        [
            rng.uniform(0.0, 1.0, 2 * n).astype(np.float32),
            np.abs(_log_uniform(rng, 1e-37, 0.5, n)),  # near 0
            (1.0 - np.abs(_log_uniform(rng, 6e-8, 0.5, n))).astype(np.float32),  # near 1
            np.float32([0.0, 1.0]),
        ]
    )


def _ref_probs(p, y):
    """float64 BCELoss with PyTorch's clamps: loss and d/dp."""
    p = np.asarray(p, np.float64)
    with np.errstate(divide="ignore"):
        log_p = np.maximum(np.log(p), -100.0)
        log_q = np.maximum(np.log1p(-p), -100.0)
    loss = -(y * log_p + (1 - y) * log_q)
    grad = (p - y) / np.maximum(p * (1 - p), 1e-12)
    return loss, grad


@pytest.mark.parametrize("y", [0.0, 1.0, 0.3])
def test_binary_cross_entropy_on_probabilities(y):
    p = _probs()
    labels = jnp.full(p.shape, np.float32(y))

    @jax.jit
    def loss_and_grad(p):
        def fn(p):
            return jaxbce.binary_cross_entropy(p, labels, reduction="none")

        return fn(p), jax.grad(lambda p: jnp.sum(fn(p)))(p)

    loss, grad = (np.asarray(v, np.float64) for v in loss_and_grad(jnp.asarray(p)))
    true_loss, true_grad = _ref_probs(p, np.float64(np.float32(y)))
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    for got, true in ((loss, true_loss), (grad, true_grad)):
        ok = _normal(true)
        ulp = _ulp(got[ok], true[ok])
        assert ulp.max() <= MAX_ULP, _worst(ulp, p[ok])
        assert np.all(got[~ok] == 0.0)
    # p = 0 and 1: the clamped loss is 100 where the label disagrees, finite gradient.
    np.testing.assert_allclose(loss[-2:], [100.0 * y, 100.0 * (1 - y)], rtol=1e-6)


# ------------------------------------------------ every formulation, called directly
#
# The kernels pick their CPU formulation when lowering for CPU, so the GPU/TPU ones are
# only reached here by calling them directly, jitted, with float32 labels of the given
# value and pos_weight as a full array; the CPU ones are called the same way (the
# public loss reaches them with labels in their own dtypes, tested further below).
# Measured with jax 0.10.2 on CPU on this module's fixed sample (asserted bounds in
# brackets):
#
# * hard loss (log1p), jitted: 2.42 ulp (y = 1), 2.00 (y = 0), 1.82 (pw 3)       [3 ulp]
# * hard gradient, y in {0, 1}: 1.96 ulp; with pos_weight 0.5 or 3.0: 2.22 ulp   [3 ulp]
# * fused loss, y in {0, 1}: 2.42 ulp; y in {0.3, 0.999}: 2.53 ulp;
#   with pos_weight 3.0: 2.00 ulp                                                [3 ulp]
# * fused gradient, y in {0, 1}: 1.96 ulp (2.22 with pos_weight 3.0); soft labels:
#   1.25 eps of its terms (1.49 with pos_weight 3.0)                             [3]
# * hard vs fused, and cpu-hard vs cpu, on hard labels: 0 ulp (bitwise equal)   [3 ulp]
# * the public loss and gradient with bool, int8, uint8 or int32 labels vs float32
#   0/1 labels: 0 ulp (bitwise equal on CPU)                                     [3 ulp]


# Every formulation of the kernels: the table's (GPU/TPU) and the CPU ones.
FORMS = {
    f.name: (f.loss, f.grad) for f in (*_core.FORMULATIONS.values(), _core.CPU, _core.CPU_HARD)
}
HARD_FORMS = ("hard", "hard-narrow", "cpu-hard")  # for labels 0 and 1 only
SOFT_FORMS = ("fused", "fused-narrow", "cpu")


@functools.cache
def _raw_fn(fn, weighted):
    if weighted:
        return jax.jit(fn)
    return jax.jit(lambda z, y: fn(z, y, None))


def _raw(fn, z, y, pw=None):
    """``fn(z, y, pw)`` jitted, for a scalar label ``y`` and scalar ``pw`` (or None)."""
    z = jnp.asarray(z)
    yy = jnp.full(z.shape, np.float32(y), jnp.float32)
    if pw is None:
        out = _raw_fn(fn, False)(z, yy)
    else:
        out = _raw_fn(fn, True)(z, yy, jnp.full(z.shape, pw, jnp.float32))
    assert out.dtype == jnp.float32 and out.shape == z.shape
    return np.asarray(out, np.float64)


def _raw_loss_errors(form, z, y, pw=None):
    """A GPU formulation's loss, its ulp where normal (else 0), and the reference."""
    y = np.float32(y)
    true = _ref_loss(z, y, 1.0 if pw is None else pw)
    got = _raw(FORMS[form][0], z, y, pw)
    unweighted = None if pw is None else _ref_loss(z, y, 1.0)
    ulp, _ = _normal_ulp(got, true, unweighted)
    return got, ulp, true


def _raw_grad_errors(form, z, y, pw=None):
    """A GPU formulation's gradient: ulp where normal (else 0), and eps of its terms."""
    y = np.float32(y)
    true, size = _ref_grad(z, y, 1.0 if pw is None else pw)
    got = _raw(FORMS[form][1], z, y, pw)
    unweighted = None if pw is None else _ref_grad(z, y, 1.0)[0]
    ulp, count = _normal_ulp(got, true, unweighted)
    return ulp, count, np.abs(got - true) / (F32.eps * size)


_RAW_CASES = [(form, y, pw) for form in HARD_FORMS for y in HARD for pw in (None, 0.5, 3.0)] + [
    (form, y, pw) for form in SOFT_FORMS for y in HARD + SOFT for pw in (None, 3.0)
]

# _loss_hard once formed log1p(e) as log(u) + (e - (u - 1)) / u; under jax.jit XLA's
# simplifier folds (1 + e) - 1 to e and the correction vanished (up to 1.6e7 ulp). These
# tests caught it; the kernel now uses log1p.


# The 16-bit logits' kernels round their results to 8 or 11 bits (a bfloat16 ulp is
# 2**16 float32 ulp); their polynomial log1p costs up to 3.25 float32 ulp here (soft
# label 0.999 with pos_weight 3), the others stay within 3.
MAX_ULP_NARROW = 3.5
# Their gradient's 1 / (1 + e) is rsqrt(1 + e)**2: up to 3.8 float32 ulp here, 5.3 on an
# H100 (experiments/formulations.py --accuracy), against 3.5 there with a division.
MAX_ULP_NARROW_GRAD = 6.0


@pytest.mark.parametrize("form, y, pw", _RAW_CASES)
def test_formulation_loss_within_3_ulp(form, y, pw):
    got, ulp, true = _raw_loss_errors(form, Z_LOSS, y, pw)
    assert np.count_nonzero(_normal(true)) > 0.5 * N
    assert ulp.max() <= (MAX_ULP_NARROW if form.endswith("narrow") else MAX_ULP), _worst(
        ulp, Z_LOSS
    )
    assert np.all(np.isfinite(got[np.isfinite(true) & (true <= F32.max)]))
    np.testing.assert_array_equal(got[true > F32.max], np.inf)


@pytest.mark.parametrize("pw", [None, 3.0])
@pytest.mark.parametrize("y", HARD)
def test_hard_loss_formula_is_accurate_op_by_op(y, pw):
    """Op by op (no jit, so no XLA simplification across ops) as well as jitted."""
    z = jnp.asarray(Z_LOSS)
    yy = jnp.full(z.shape, np.float32(y))
    pww = None if pw is None else jnp.full(z.shape, pw, jnp.float32)
    got = np.asarray(FORMS["hard"][0](z, yy, pww), np.float64)
    true = _ref_loss(Z_LOSS, np.float32(y), 1.0 if pw is None else pw)
    unweighted = None if pw is None else _ref_loss(Z_LOSS, np.float32(y), 1.0)
    ulp, count = _normal_ulp(got, true, unweighted)
    assert count > 0.5 * N
    assert ulp.max() <= MAX_ULP, _worst(ulp, Z_LOSS)


@pytest.mark.parametrize("form, y, pw", _RAW_CASES)
def test_formulation_gradient_within_3_ulp_or_3_eps(form, y, pw):
    ulp, count, err = _raw_grad_errors(form, Z_GRAD, y, pw)
    if y in HARD:
        assert count > 0.9 * N
        bound = MAX_ULP_NARROW_GRAD if form.endswith("narrow") else MAX_ULP
        assert ulp.max() <= bound, _worst(ulp, Z_GRAD)
    else:
        assert err.max() <= MAX_EPS, _worst(err, Z_GRAD)


@pytest.mark.parametrize("form, y, pw", [c for c in _RAW_CASES if c[1] in (0.0, 1.0, 0.3)])
def test_formulation_extreme_logits(form, y, pw):
    """Exact special values at infinite logits, finite true gradient everywhere."""
    z = EXTREME_Z
    y32 = np.float32(y)
    w = 1.0 if pw is None else pw
    loss_fn, grad_fn = FORMS[form]
    loss, grad = _raw(loss_fn, z, y32, pw), _raw(grad_fn, z, y32, pw)
    true_loss = _ref_loss(z, y32, w)
    true_grad, _ = _ref_grad(z, y32, w)

    inf = (z == np.inf) & (y != 1.0) | (z == -np.inf) & (y != 0.0)
    zero = (z == np.inf) & (y == 1.0) | (z == -np.inf) & (y == 0.0)
    np.testing.assert_array_equal(np.isinf(true_loss), inf)
    np.testing.assert_array_equal(loss[inf | (true_loss > F32.max)], np.inf)
    np.testing.assert_array_equal(loss[zero], 0.0)
    finite = (true_loss <= F32.max) & ~zero
    assert np.all(_ulp(loss[finite], true_loss[finite]) <= MAX_ULP), (loss, true_loss)

    assert np.all(np.isfinite(grad)), grad
    ok = _normal(true_grad) & _normal(_ref_grad(z, y32)[0])
    bound = MAX_ULP_NARROW_GRAD if form.endswith("narrow") else MAX_ULP
    assert np.all(_ulp(grad[ok], true_grad[ok]) <= bound), (grad, true_grad)
    assert np.all(np.abs(grad[~ok]) <= w * F32.tiny), (grad, true_grad)


def _nearest_bits(v: np.ndarray, dtype) -> np.ndarray:
    """The bits of the ``dtype`` (16-bit) value nearest to float64 ``v``, ties to even.

    Casting float64 to bfloat16 goes through float32 and can round twice, so the
    candidates around that cast are compared in float64.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        b = v.astype(dtype).view(np.uint16).astype(np.int64)
        cands = np.stack([b - 1, b, b + 1]) & 0xFFFF
        dist = np.abs(cands.astype(np.uint16).view(dtype).astype(np.float64) - v)
    dist = np.where(np.isnan(dist), np.inf, dist)
    nearest = dist == dist.min(axis=0)
    even = nearest & (cands & 1 == 0)
    pick = np.where(even.any(axis=0), even.argmax(axis=0), nearest.argmax(axis=0))
    return np.take_along_axis(cands, pick[None], axis=0)[0]


def _ordered(bits: np.ndarray) -> np.ndarray:
    """16-bit sign-magnitude float bits onto an ordered integer line (ulp distances)."""
    bits = bits.astype(np.int64)
    return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)


# Over every finite 16-bit logit, with labels 0 and 1: how many float32 results of the
# 16-bit logits' kernels, rounded to the logits' dtype (as jaxbce returns them), differ
# from the correctly rounded true value (results within float32's normal range). Here
# (XLA:CPU): bfloat16 1 loss, 0 gradients of 65280; float16 3 losses and 8 gradients
# of 63488. On an H100, the hard-label kernel: bfloat16 0 and 0; float16 2 and 9; the
# float32 kernel 0 and 0, 2 and 6 (experiments/formulations.py --accuracy); this test
# passed there for both kernels. Never by more than 1 ulp.
MAX_WRONG_16BIT = {"bfloat16": 2, "float16": 12}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("form", ["hard-narrow", "fused-narrow"])
def test_narrow_kernels_round_correctly_for_every_16_bit_logit(form, dtype):
    dtype = np.dtype(dtype)
    z16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype)
    z16 = z16[np.isfinite(z16.astype(np.float32))]
    z, zd = z16.astype(np.float32), z16.astype(np.float64)
    for y in (0.0, 1.0):
        truths = (_ref_loss(zd, np.float64(y), 1.0), _ref_grad(zd, np.float64(y), 1.0)[0])
        for fn, true in zip(FORMS[form], truths, strict=True):
            got = _raw(fn, z, y).astype(np.float32).astype(dtype).view(np.uint16)
            dist = np.abs(_ordered(got) - _ordered(_nearest_bits(true, dtype)))
            normal = np.abs(true) >= F32.tiny
            assert dist[normal].max() <= 1, _worst(dist[normal], zd[normal])
            assert np.count_nonzero(dist[normal]) <= MAX_WRONG_16BIT[dtype.name], zd[normal][
                dist[normal] > 0
            ]


@pytest.mark.parametrize("hard_form, form", [("hard", "fused"), ("cpu-hard", "cpu")])
@pytest.mark.parametrize("which", [pytest.param(0, id="loss"), pytest.param(1, id="grad")])
@pytest.mark.parametrize("pw", [None, 0.5, 3.0])
@pytest.mark.parametrize("y", HARD)
def test_hard_formulation_agrees_with_general_on_hard_labels(y, pw, which, hard_form, form):
    z = (Z_LOSS, Z_GRAD)[which]
    hard = _raw(FORMS[hard_form][which], z, y, pw)
    fused = _raw(FORMS[form][which], z, y, pw)
    # Same inf entries; within 3 ulp where both are normal, both tiny elsewhere.
    np.testing.assert_array_equal(np.isinf(hard), np.isinf(fused))
    ok = _normal(fused) & _normal(hard)
    assert np.count_nonzero(ok) > 0.5 * N
    ulp = _ulp(hard[ok], fused[ok])
    assert ulp.max() <= MAX_ULP, _worst(ulp, z[ok])
    for v in (hard, fused):
        assert np.all(np.abs(v[~ok & np.isfinite(v)]) <= 3 * F32.tiny)
    # Identical at the special values of EXTREME_Z (+-inf logits, inf and 0 results).
    z = EXTREME_Z
    hard = _raw(FORMS[hard_form][which], z, y, pw)
    fused = _raw(FORMS[form][which], z, y, pw)
    special = np.isinf(z) | np.isinf(fused) | (fused == 0)
    assert np.any(special)
    np.testing.assert_array_equal(hard[special], fused[special])


# ---------------------------------------------------- bool and integer labels


@functools.cache
def _public_fns():
    def loss(z, y, pw):
        return jaxbce.binary_cross_entropy_with_logits(z, y, pos_weight=pw, reduction="none")

    def grad(z, y, pw):
        return jax.grad(lambda z: jnp.sum(loss(z, y, pw)))(z)

    return jax.jit(loss), jax.jit(grad)


def _public(z, labels, pw=None):
    z = jnp.asarray(z)
    pw = None if pw is None else jnp.full(z.shape, pw, jnp.float32)
    return tuple(np.asarray(f(z, labels, pw), np.float64) for f in _public_fns())


def _hard_labels(n, dtype, seed=0):
    y = np.random.default_rng(SEED + 10 + seed).integers(0, 2, n)
    return jnp.asarray(y.astype(dtype))


@pytest.mark.parametrize("pw", [None, 3.0])
@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.uint8, np.int32])
def test_bool_and_integer_labels_give_the_float_label_loss_and_gradient(dtype, pw):
    for i, z in enumerate((Z_LOSS, Z_GRAD)):
        labels = _hard_labels(z.size, dtype, seed=i)
        want = _public(z, labels.astype(jnp.float32), pw)[i]
        got = _public(z, labels, pw)[i]
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        np.testing.assert_array_equal(got == 0, want == 0)
        ok = _normal(want)
        assert np.count_nonzero(ok) > 0.5 * N
        ulp = _ulp(got[ok], want[ok])
        assert ulp.max() <= MAX_ULP, _worst(ulp, z[ok])


@pytest.mark.parametrize("pw", [None, 3.0])
def test_nonzero_integer_labels_are_positives(pw):
    z = np.concatenate([Z_GRAD, EXTREME_Z])
    one = _public(z, jnp.ones(z.shape, jnp.int8), pw)
    for value in (2, -3, 127, -128):
        got = _public(z, jnp.full(z.shape, value, jnp.int8), pw)
        for g, w in zip(got, one, strict=True):
            np.testing.assert_array_equal(g, w)
    zero = _public(z, jnp.zeros(z.shape, jnp.int8), pw)
    # Not the negative class: the loss differs from y = 0 wherever z is not +-0 or tiny.
    assert np.all(one[0][np.abs(z) > 1e-3] != zero[0][np.abs(z) > 1e-3])


# ------------------------------------------------------------- the polynomial log1p


def test_log1p_unit_within_2_2_ulp_on_the_unit_interval():
    """``_log1p_unit`` on 2**20 float32 values in (0, 1], uniform and log-uniform, and the
    ends: 1.81 ulp with fused multiply-adds (XLA:CPU forms them under jit), 2.16 without."""
    rng = np.random.default_rng(11)
    x = np.concatenate(
        [
            rng.uniform(0, 1, 1 << 19),
            np.exp(rng.uniform(np.log(1e-37), 0, 1 << 19)),
            [1.0, np.nextafter(np.float32(1), np.float32(0)), F32.tiny, 2.0**-24],
        ]
    ).astype(np.float32)
    got = np.asarray(jax.jit(ew.log1p_unit)(jnp.asarray(x)), np.float64)
    true = np.log1p(x.astype(np.float64))
    ulp = _ulp(got, true)
    assert ulp.max() <= 2.2, _worst(ulp, x)
    np.testing.assert_array_equal(ew.log1p_unit(jnp.array([0.0, np.nan])), [0.0, np.nan])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64])
def test_neg_abs_bits_is_neg_abs_bit_for_bit(dtype):
    """The gradients' ``-|z|`` (a sign bit) has the bits of ``-abs(z)`` for signed zeros,
    subnormals, infinities, NaN of either sign and the extremes, and the derivative of
    :func:`ew.neg_abs` (-1 at 0, both orders)."""
    with jax.enable_x64(dtype == jnp.float64):
        info = jnp.finfo(dtype)
        z = np.array([0.0, 1.0, 2.5, info.tiny / 4, info.tiny, info.max, np.inf, np.nan])
        z = jnp.asarray(np.concatenate([z, -z]), dtype)
        got = np.asarray(jax.jit(ew.neg_abs_bits)(z))
        assert got.tobytes() == np.asarray(-jnp.abs(z)).tobytes()
        assert got.tobytes() == np.asarray(ew.neg_abs(z)).tobytes()
        x = jnp.array([-1.5, -0.0, 0.0, 2.0], dtype)
        for f in (jax.grad, lambda g: jax.grad(jax.grad(g))):
            got, want = (
                jax.vmap(f(lambda t, n=n: jnp.exp(n(t))))(x) for n in (ew.neg_abs_bits, ew.neg_abs)
            )
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(jax.vmap(jax.grad(ew.neg_abs_bits))(x), [1, -1, -1, -1])


def test_log1p_unit_keeps_float64_exact_with_xla_log1p():
    with jax.enable_x64(True):
        x = jnp.linspace(0.0, 1.0, 101, dtype=jnp.float64)
        np.testing.assert_array_equal(ew.log1p_unit(x), jnp.log1p(x))
