"""Tests of jaxbce/_sparse.py: BCE with sparse positive-index targets.

The reference is :func:`jaxbce.binary_cross_entropy_with_logits` on the equivalent dense
labels. Values: per element (``"none"``) they agree to rounding; reduced, the sparse
sum takes every class as a negative and then adds ``bce(z, 1) - bce(z, 0)`` at each
positive, so it is compared within 1e-6 of the size of its terms (both sums of
non-negative losses). Gradients: the positives' entries are overwritten, not
corrected, so they agree with the dense gradient to 2e-6 relative, entry by entry.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.test_util import check_grads

import jaxbce
from jaxbce import check_positive_indices, sparse_binary_cross_entropy_with_logits

sparse_bce = sparse_binary_cross_entropy_with_logits
dense_bce = jaxbce.binary_cross_entropy_with_logits
REDUCTIONS = ("none", "sum", "mean", "weighted_mean")
B, C, K = 5, 11, 4


def to_dense(idx, num_classes, pad=-1):
    y = np.zeros((len(idx), num_classes), np.float32)
    for b, row in enumerate(np.asarray(idx)):
        for k in row:
            if k != pad:
                y[b, k] = 1.0
    return y


@functools.cache
def problem():
    """Logits with confident positives and negatives; duplicates, pad, an empty row."""
    r = np.random.default_rng(0)
    z = (r.standard_normal((B, C)) * 6).astype(np.float32)
    idx = r.integers(0, C, (B, K)).astype(np.int32)
    idx[0] = [1, 1, 3, -1]  # duplicate and pad
    idx[1] = [2, -1, -1, 2]
    idx[2] = -1  # no positives
    z[0, 1], z[1, 2], z[3, idx[3, 0]] = 25.0, -30.0, 20.0
    w = r.uniform(0.1, 2.0, (C,)).astype(np.float32)
    pw = r.uniform(0.5, 3.0, (C,)).astype(np.float32)
    mask = r.uniform(size=(B, C)) > 0.3
    return z, idx, w, pw, mask


OPTIONS = {
    "plain": {},
    "pos_weight_smoothing": dict(pos_weight="pw", label_smoothing=0.1),
    "row_weight_and_mask": dict(weight="w_rows", where="mask_rows"),
    "all": dict(weight="w", pos_weight="pw", label_smoothing=0.2, where="mask"),
}


def options(name):
    z, idx, w, pw, mask = problem()
    arrays = {
        "w": w,
        "pw": pw,
        "mask": mask,
        "w_rows": np.linspace(0.5, 1.5, B, dtype=np.float32)[:, None],
        "mask_rows": np.array([True, False, True, True, True])[:, None],
    }
    return {k: arrays.get(v, v) if isinstance(v, str) else v for k, v in OPTIONS[name].items()}


def value_and_grad(z, target, kw, *, axis, reduction, dense):
    """Eager on purpose: the many option combinations share the compiled primitives."""
    fn = dense_bce if dense else sparse_bce

    def total(z):
        return jnp.sum(fn(z, target, axis=axis, reduction=reduction, **kw))

    return fn(z, target, axis=axis, reduction=reduction, **kw), jax.grad(total)(z)


class TestEqualsDense:
    @pytest.mark.parametrize(
        "opts, axis",
        [(o, None) for o in OPTIONS] + [("all", a) for a in (0, 1, -1, (0, 1))],
    )
    @pytest.mark.parametrize("reduction", REDUCTIONS)
    def test_values_and_gradients(self, reduction, axis, opts):
        z, idx, *_ = problem()
        kw = options(opts)
        y = to_dense(idx, C)
        got, g_got = value_and_grad(z, idx, kw, axis=axis, reduction=reduction, dense=False)
        want, g_want = value_and_grad(z, y, kw, axis=axis, reduction=reduction, dense=True)
        assert got.shape == want.shape and got.dtype == want.dtype
        # the size of the terms: the all-negatives loss plus the true loss
        size, _ = value_and_grad(z, 0 * y, kw, axis=axis, reduction=reduction, dense=True)
        assert np.all(np.abs(got - want) <= 1e-6 * (np.abs(size) + np.abs(want)))
        np.testing.assert_allclose(g_got, g_want, rtol=2e-6, atol=0)

    def test_none_is_the_dense_loss(self):
        z, idx, w, pw, mask = problem()
        kw = dict(weight=w, pos_weight=pw, label_smoothing=0.1, where=mask, reduction="none")
        got = sparse_bce(z, idx, **kw)
        np.testing.assert_allclose(got, dense_bce(z, to_dense(idx, C), **kw), rtol=1e-6)

    def test_confident_positive_gradient_is_not_cancelled(self):
        """sigmoid(20) - 1 rounds to 0 in float32; the true gradient is -2.06e-9."""
        z, idx, *_ = problem()
        g, g_dense = (
            value_and_grad(z, t, {}, axis=None, reduction="sum", dense=d)[1]
            for t, d in ((idx, False), (to_dense(idx, C), True))
        )
        np.testing.assert_allclose(g, g_dense, rtol=1e-6)
        assert z[3, idx[3, 0]] == 20.0
        np.testing.assert_allclose(g[3, idx[3, 0]], -2.0611537e-09, rtol=1e-6)
        np.testing.assert_allclose(g[0, 1], -1.3887944e-11, rtol=1e-6)  # z = 25

    @pytest.mark.parametrize("reduction, axis", [("sum", None), ("weighted_mean", 0), ("mean", 1)])
    def test_derivatives_wrt_weights_and_smoothing(self, reduction, axis):
        z, idx, w, pw, mask = problem()

        def total(fn, target, w, pw, eps):
            kw = dict(weight=w, pos_weight=pw, label_smoothing=eps, where=mask)
            return jnp.sum(fn(z, target, axis=axis, reduction=reduction, **kw))

        args = (w, pw, 0.1)
        got = jax.grad(functools.partial(total, sparse_bce, idx), (0, 1, 2))(*args)
        want = jax.grad(functools.partial(total, dense_bce, to_dense(idx, C)), (0, 1, 2))(*args)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)

    def test_integer_index_dtypes_and_no_positives(self):
        z, idx, *_ = problem()
        want = dense_bce(z, to_dense(idx, C))
        for dt in (np.int8, np.uint8, np.int16, np.int64):
            i = np.where(idx < 0, C, idx).astype(dt) if dt == np.uint8 else idx.astype(dt)
            np.testing.assert_allclose(sparse_bce(z, i, pad=C if dt == np.uint8 else -1), want)
        empty = np.zeros((B, 0), np.int32)
        np.testing.assert_allclose(sparse_bce(z, empty), dense_bce(z, np.zeros_like(z)))

    def test_wide_classes_narrow_indices(self):
        """uint8 indices with 300 classes: no overflow in the range checks."""
        z = jnp.zeros((2, 300))
        idx = np.array([[255, 0], [7, 7]], np.uint8)
        got = jax.jit(sparse_bce)(z, idx)
        np.testing.assert_allclose(got, dense_bce(z, to_dense(idx, 300)))

    def test_traced_indices_out_of_range_are_ignored_like_pad(self):
        z, idx, *_ = problem()
        bad = idx.copy()
        bad[0, 3], bad[2, 0] = C + 5, -7
        got = jax.jit(sparse_bce)(z, jnp.asarray(bad))
        np.testing.assert_allclose(got, sparse_bce(z, idx), rtol=1e-7)

    def test_vmap_and_jit(self):
        z, idx, *_ = problem()
        zz = jnp.stack([z, -z])
        ii = jnp.stack([idx, idx[::-1]])
        got = jax.jit(jax.vmap(sparse_bce))(zz, ii)
        want = [dense_bce(zz[n], to_dense(ii[n], C)) for n in range(2)]
        np.testing.assert_allclose(got, want, rtol=1e-6)

    def test_traced_label_smoothing(self):
        z, idx, *_ = problem()
        f = jax.jit(lambda z, e: sparse_bce(z, idx, label_smoothing=e))
        want = dense_bce(z, to_dense(idx, C), label_smoothing=0.3)
        np.testing.assert_allclose(f(z, 0.3), want, rtol=1e-6)

    def test_bfloat16_logits(self):
        z, idx, *_ = problem()
        zb = jnp.asarray(z, jnp.bfloat16)
        got = sparse_bce(zb, idx, reduction="sum")
        assert got.dtype == jnp.float32  # reduced in float32, as the dense loss
        want = dense_bce(zb, to_dense(idx, C), reduction="sum")
        np.testing.assert_allclose(got, want, rtol=1e-6)
        none = sparse_bce(zb, idx, reduction="none")
        assert none.dtype == jnp.bfloat16
        g = jax.grad(sparse_bce)(zb, idx)
        assert g.dtype == jnp.bfloat16


class TestDerivatives:
    def test_check_grads(self):
        """Order 2 w.r.t. the logits (the custom rule); order 1 w.r.t. the weights."""
        z, idx, w, pw, mask = problem()

        def losses(z, w, pw):
            kw = dict(weight=w, pos_weight=pw, label_smoothing=0.1, where=mask)
            mean = sparse_bce(z, idx, reduction="weighted_mean", **kw)
            return mean, sparse_bce(z, idx, axis=0, reduction="sum", **kw)

        with jax.enable_x64(True):
            z, w, pw = z.astype(np.float64) / 3, w.astype(np.float64), pw.astype(np.float64)
            check_grads(jax.jit(lambda z: losses(z, w, pw)), (z,), order=2, modes=("rev",))
            check_grads(jax.jit(lambda w, pw: losses(z, w, pw)[0]), (w, pw), order=1)

    def test_custom_rule_is_used(self):
        z, idx, *_ = problem()
        jaxpr = jax.make_jaxpr(sparse_bce)(z, idx)
        assert "custom_jvp_call" in str(jaxpr)

    def test_int_indices_under_grad_and_jvp(self):
        z, idx, *_ = problem()
        g = jax.grad(sparse_bce)(z, idx)
        _, t = jax.jvp(lambda z: sparse_bce(z, idx), (z,), (jnp.ones_like(z),))
        np.testing.assert_allclose(t, jnp.sum(g), rtol=1e-5)


class TestNoDenseLabels:
    def test_compiled_value_and_grad_moves_only_logits_and_gradient(self):
        """In the compiled value_and_grad of the mean, every [B, C] array is float32 (no
        integer, bool or float label array) and there is no [B, C] temporary beyond the
        gradient on CPU: XLA:CPU keeps the logits, one fusion for the gradient and the
        scatter that patches it in place."""
        b, c, k = 64, 1000, 8
        f = jax.jit(jax.value_and_grad(lambda z, i: sparse_bce(z, i)))
        compiled = f.lower(jnp.zeros((b, c)), jnp.zeros((b, k), jnp.int32)).compile()
        hlo = compiled.as_text()
        entry = hlo[hlo.index("ENTRY") :].splitlines()
        # instructions of the entry computation whose result is [B, C] (what is
        # materialised in memory; temporaries inside a fusion are not)
        big = [ln for ln in entry if re.search(rf"= \w+\[{b},{c}\]", ln)]
        assert all(re.search(rf"= f32\[{b},{c}\]", ln) for ln in big), big
        if jax.default_backend() == "cpu":
            kinds = sorted(
                "param" if "parameter(" in ln else "scatter" if "scatter" in ln else "fusion"
                for ln in big
            )
            assert kinds == ["fusion", "param", "scatter"], big
        # Temporaries: none of [B, C] on CPU. On an H100 XLA keeps one [B, C] float32
        # temporary (256,784 B here): the per-element loss, summed in a kernel of its own
        # below about 2^20 elements; still no label array (docs/performance.md).
        temp = compiled.memory_analysis().temp_size_in_bytes
        arrays = 1 if jax.default_backend() == "cpu" else 2
        assert temp < arrays * b * c * 4, temp


class TestErrors:
    @pytest.mark.parametrize(
        "idx, err, match",
        [
            (np.zeros((B, 2), np.float32), TypeError, "integer array"),
            (np.zeros((B, 2), bool), TypeError, "integer array"),
            (np.zeros((B,), np.int32), ValueError, "shape"),
            (np.zeros((B, 2, 1), np.int32), ValueError, "shape"),
            (np.zeros((B + 1, 2), np.int32), ValueError, "shape"),
            (np.full((B, 2), C), ValueError, "neither pad"),
            (np.full((B, 2), -2), ValueError, "neither pad"),
        ],
    )
    def test_bad_indices(self, idx, err, match):
        z = jnp.zeros((B, C))
        with pytest.raises(err, match=match):
            sparse_bce(z, idx)

    def test_traced_bad_dtype_and_shape_fail_at_trace_time(self):
        z = jnp.zeros((B, C))
        with pytest.raises(TypeError, match="integer array"):
            jax.jit(sparse_bce)(z, jnp.zeros((B, 2)))
        with pytest.raises(ValueError, match="shape"):
            jax.jit(sparse_bce)(z, jnp.zeros((B, 2, 2), jnp.int32))

    @pytest.mark.parametrize(
        "kw, err, match",
        [
            (dict(pad=3), ValueError, "valid class index"),
            (dict(pad=1.5), TypeError, "pad must be"),
            (dict(where=np.ones((B, C))), TypeError, "where must be"),
            (dict(weight=np.ones((B + 1, C))), ValueError, "weight with shape"),
            (dict(pos_weight=np.ones(C + 1)), ValueError, "pos_weight with shape"),
            (dict(reduction="avg"), ValueError, "reduction"),
            (dict(axis=2), ValueError, "out of range"),
            (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        ],
    )
    def test_bad_options(self, kw, err, match):
        z = jnp.zeros((B, C))
        with pytest.raises(err, match=match):
            sparse_bce(z, np.zeros((B, 2), np.int32), **kw)

    def test_bad_logits(self):
        with pytest.raises(TypeError, match="floating"):
            sparse_bce(jnp.zeros((B, C), jnp.int32), np.zeros((B, 2), np.int32))
        with pytest.raises(ValueError, match="rank 2"):
            sparse_bce(jnp.zeros((2, B, C)), np.zeros((B, 2), np.int32))


class TestRuntimeCheck:
    def _checked(self):
        def loss_fn(z, idx):
            check_positive_indices(idx, z.shape[-1])
            return sparse_bce(z, idx)

        return jax.jit(checkify.checkify(loss_fn))

    def test_valid_indices_pass(self):
        z, idx, *_ = problem()
        err, loss = self._checked()(z, idx)
        err.throw()
        np.testing.assert_allclose(loss, sparse_bce(z, idx))

    def test_out_of_range_is_reported(self):
        z, idx, *_ = problem()
        bad = idx.copy()
        bad[3, 2] = C
        err, _ = self._checked()(z, bad)
        with pytest.raises(checkify.JaxRuntimeError, match=r"1 entries .* \(first 11, row 3\)"):
            err.throw()

    def test_custom_pad(self):
        idx = jnp.array([[0, 9], [9, 9]])
        err = checkify.checkify(lambda i: check_positive_indices(i, 4, pad=9))(idx)[0]
        err.throw()
        err = checkify.checkify(lambda i: check_positive_indices(i, 4))(idx)[0]
        with pytest.raises(checkify.JaxRuntimeError, match="3 entries"):
            err.throw()


def test_inf_weight_at_a_masked_out_positive_stays_out():
    z = jnp.zeros((1, 3))
    w = jnp.array([1.0, jnp.inf, 1.0])
    keep = jnp.array([True, False, True])
    got = jaxbce.sparse_binary_cross_entropy_with_logits(
        z, jnp.array([[1]]), weight=w, where=keep, reduction="sum"
    )
    want = jaxbce.binary_cross_entropy_with_logits(
        z, jnp.array([[0, 1, 0]]), weight=w, where=keep, reduction="sum"
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.isfinite(got)
