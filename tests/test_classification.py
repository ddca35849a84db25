"""Tests of the public losses in jaxbce/_classification.py: semantics, errors, transforms."""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbce

bce = jaxbce.binary_cross_entropy_with_logits


ref_bce = reference.bce_reduced


def rng_inputs(shape, seed=0, soft=True):
    r = np.random.default_rng(seed)
    z = (r.standard_normal(shape) * 4).astype(np.float32)
    y = r.uniform(size=shape) if soft else (r.uniform(size=shape) > 0.5)
    return z, y.astype(np.float32)


class TestValues:
    @pytest.mark.parametrize("reduction", ["none", "sum", "mean", "weighted_mean"])
    @pytest.mark.parametrize("axis", [None, -1, 0, (0, 1)])
    def test_matches_reference_all_options(self, reduction, axis):
        z, y = rng_inputs((6, 5, 3), seed=1)
        r = np.random.default_rng(2)
        w = r.uniform(0.1, 2.0, size=(5, 3)).astype(np.float32)
        pw = r.uniform(0.5, 4.0, size=(3,)).astype(np.float32)
        mask = r.uniform(size=(6, 5, 3)) > 0.3
        got = bce(
            z,
            y,
            weight=w,
            pos_weight=pw,
            label_smoothing=0.1,
            where=mask,
            axis=axis,
            reduction=reduction,
        )
        want = ref_bce(z, y, w=w, pw=pw, eps=0.1, mask=mask, axis=axis, reduction=reduction)
        assert got.shape == np.shape(want)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)

    def test_default_is_mean_over_all_elements(self):
        z, y = rng_inputs((4, 7), seed=3)
        np.testing.assert_allclose(bce(z, y), ref_bce(z, y), rtol=1e-6)

    def test_mean_with_weight_divides_by_count_like_pytorch(self):
        z, y = rng_inputs((8,), seed=4)
        w = np.linspace(0.0, 3.0, 8, dtype=np.float32)
        got = bce(z, y, weight=w)
        np.testing.assert_allclose(got, (ref_bce(z, y, reduction="none") * w).mean(), rtol=1e-6)
        got_wm = bce(z, y, weight=w, reduction="weighted_mean")
        want_wm = (ref_bce(z, y, reduction="none") * w).sum() / w.sum()
        np.testing.assert_allclose(got_wm, want_wm, rtol=1e-6)

    def test_pos_weight_per_class_broadcasts_over_batch(self):
        z, y = rng_inputs((5, 3), seed=5, soft=False)
        pw = np.array([1.0, 2.0, 10.0], np.float32)
        got = bce(z, y, pos_weight=pw, reduction="none")
        np.testing.assert_allclose(got, ref_bce(z, y, pw=pw, reduction="none"), rtol=2e-6)
        # a positive with pos_weight 10 costs 10x the plain positive term
        np.testing.assert_allclose(
            bce(z[:, 2], np.ones(5, np.float32), pos_weight=10.0, reduction="none"),
            10 * bce(z[:, 2], np.ones(5, np.float32), reduction="none"),
            rtol=2e-6,
        )

    def test_label_smoothing_keras_semantics(self):
        z, y = rng_inputs((10,), seed=6, soft=False)
        eps = 0.2
        np.testing.assert_allclose(
            bce(z, y, label_smoothing=eps, reduction="none"),
            bce(z, y * (1 - eps) + eps / 2, reduction="none"),
            rtol=1e-6,
        )

    @pytest.mark.parametrize("dtype", [jnp.bool_, jnp.int8, jnp.int32, jnp.uint8, jnp.float16])
    def test_bool_and_int_labels(self, dtype):
        z, y = rng_inputs((12,), seed=7, soft=False)
        yl = jnp.asarray(y).astype(dtype)
        np.testing.assert_allclose(bce(z, yl), bce(z, y), rtol=1e-7)
        g = jax.grad(bce)(jnp.asarray(z), yl)
        np.testing.assert_allclose(g, jax.grad(bce)(jnp.asarray(z), jnp.asarray(y)), rtol=1e-7)

    def test_where_and_ignore_index(self):
        z, y = rng_inputs((6, 4), seed=8, soft=False)
        y_missing = np.where(np.arange(24).reshape(6, 4) % 5 == 0, -1, y).astype(np.int32)
        keep = y_missing != -1
        got = bce(z, y_missing, ignore_index=-1)
        np.testing.assert_allclose(got, ref_bce(z, y, mask=keep), rtol=1e-6)
        np.testing.assert_allclose(bce(z, y, where=keep), got, rtol=1e-7)
        # both combine: an entry must pass both to count
        extra = np.arange(24).reshape(6, 4) % 3 != 0
        got2 = bce(z, y_missing, ignore_index=-1, where=extra)
        np.testing.assert_allclose(got2, ref_bce(z, y, mask=keep & extra), rtol=1e-6)

    @pytest.mark.parametrize(
        "labels, ignore_index, kept",
        [
            (np.array([True, False]), -1, [True, True]),  # -1 is not True
            (np.array([1, 0], np.int32), 0.5, [True, True]),  # 0.5 is not 0
            (np.array([1, 255], np.uint8), 255, [True, False]),
            (np.array([1, 0], np.uint8), -1, [True, True]),  # no overflow error
            (np.array([1.0, np.nan], np.float32), np.nan, [True, False]),  # NaN = missing
        ],
    )
    def test_ignore_index_is_compared_exactly(self, labels, ignore_index, kept):
        z = jnp.array([2.0, -1.0])
        got = bce(z, labels, ignore_index=ignore_index, reduction="none")
        want = np.where(
            kept, ref_bce(z, np.nan_to_num(labels.astype(np.float64)), reduction="none"), 0.0
        )
        np.testing.assert_allclose(got, want, rtol=1e-6)
        g = jax.grad(bce)(z, labels, ignore_index=ignore_index)
        assert np.all(np.isfinite(g))

    def test_empty_input_mean_is_zero(self):
        assert bce(jnp.zeros((0,)), jnp.zeros((0,))) == 0
        np.testing.assert_array_equal(bce(jnp.zeros((3, 0)), jnp.zeros((3, 0)), axis=1), 0)

    def test_masked_nan_labels_give_finite_loss_and_gradient(self):
        z = jnp.array([0.5, -1.0, 2.0])
        y = jnp.array([1.0, jnp.nan, 0.0])
        keep = ~jnp.isnan(y)
        loss, g = jax.value_and_grad(bce)(z, y, where=keep)
        np.testing.assert_allclose(loss, ref_bce(z[keep], y[keep]), rtol=1e-6)
        assert np.all(np.isfinite(g)) and g[1] == 0

    def test_nan_logit_outside_mask_propagates(self):
        z = jnp.array([jnp.nan, 1.0])
        assert np.isnan(bce(z, jnp.array([1.0, 0.0])))
        assert np.isfinite(bce(z, jnp.array([1.0, 0.0]), where=jnp.array([False, True])))

    @pytest.mark.parametrize("reduction", ["mean", "weighted_mean"])
    def test_empty_selection_mean_is_zero_with_zero_gradient(self, reduction):
        z = jnp.array([1.0, -2.0, 3.0])
        y = jnp.array([1.0, 0.0, 1.0])
        mask = jnp.zeros(3, bool)
        loss, g = jax.value_and_grad(bce)(z, y, where=mask, weight=jnp.ones(3), reduction=reduction)
        assert loss == 0 and np.all(g == 0)
        per_row = bce(z.reshape(3, 1), y.reshape(3, 1), where=mask.reshape(3, 1), axis=1)
        np.testing.assert_array_equal(per_row, np.zeros(3))

    def test_infinite_logits_exact(self):
        z = jnp.array([jnp.inf, -jnp.inf, jnp.inf, -jnp.inf, jnp.inf, -jnp.inf])
        y = jnp.array([1.0, 0.0, 0.0, 1.0, 0.3, 0.3])
        loss, g = jax.vmap(jax.value_and_grad(bce))(z, y)
        np.testing.assert_array_equal(loss, [0, 0, np.inf, np.inf, np.inf, np.inf])
        np.testing.assert_array_equal(g, np.float32([0, 0, 1, -1, 1 - 0.3, -0.3]))


class TestDtypes:
    @pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
    def test_none_and_gradient_keep_the_logits_dtype_reductions_are_float32(self, dtype):
        z, y = rng_inputs((64,), seed=9)
        zl = jnp.asarray(z).astype(dtype)
        assert bce(zl, y, reduction="none").dtype == dtype
        for kw in [{}, dict(reduction="sum"), dict(axis=-1), dict(reduction="weighted_mean")]:
            assert bce(zl, y, **kw).dtype == jnp.float32, kw
        assert jax.grad(bce)(zl, y).dtype == dtype
        # arithmetic and the mean run in float32, on the logits' values
        want = ref_bce(np.asarray(zl.astype(jnp.float32)), y)
        np.testing.assert_allclose(bce(zl, y), want, rtol=1e-6)

    @pytest.mark.parametrize("fn", ["dense", "sparse", "focal"])
    def test_float16_sum_beyond_float16_range_is_finite(self, fn):
        """100,000 losses of 3.05 sum to 305,000 > 65504, the largest float16."""
        z = jnp.full((100, 1000), 3.0, jnp.float16)
        y = jnp.zeros((100, 1000), jnp.bool_)
        if fn == "dense":
            got = bce(z, y, reduction="sum")
        elif fn == "sparse":
            idx = jnp.full((100, 1), -1)
            got = jaxbce.sparse_binary_cross_entropy_with_logits(z, idx, reduction="sum")
        else:
            got = jaxbce.sigmoid_focal_loss(z, y, alpha=None, gamma=0.0, reduction="sum")
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, 1e5 * np.logaddexp(0, 3.0), rtol=1e-5)

    def test_float64_logits_stay_float64(self):
        with jax.enable_x64(True):
            z = jnp.array([1e-3, 30.0, -40.0], jnp.float64)
            y = jnp.array([1.0, 0.0, 0.25], jnp.float64)
            got = bce(z, y, reduction="none")
            assert got.dtype == jnp.float64
            np.testing.assert_allclose(got, ref_bce(z, y, reduction="none"), rtol=1e-14)


class TestErrors:
    def test_label_shape_mismatch_is_not_broadcast(self):
        with pytest.raises(ValueError, match=r"labels shape \(4,\) and logits shape \(4, 1\)"):
            bce(jnp.zeros((4, 1)), jnp.zeros(4))
        with pytest.raises(ValueError, match="exactly the shape"):
            jaxbce.sigmoid_binary_cross_entropy(jnp.zeros((4, 1)), jnp.zeros(4))

    @pytest.mark.parametrize("name", ["weight", "pos_weight", "where"])
    def test_options_that_do_not_broadcast(self, name):
        bad = jnp.ones((3,), bool if name == "where" else jnp.float32)
        with pytest.raises(ValueError, match=rf"{name} with shape \(3,\) does not broadcast"):
            bce(jnp.zeros((2, 4)), jnp.zeros((2, 4)), **{name: bad})

    @pytest.mark.parametrize("name", ["weight", "pos_weight", "where"])
    def test_options_that_would_enlarge_logits(self, name):
        big = jnp.ones((5, 4), bool if name == "where" else jnp.float32)
        with pytest.raises(ValueError, match=name):
            bce(jnp.zeros((4,)), jnp.zeros((4,)), **{name: big})

    def test_unknown_reduction_lists_valid_ones(self):
        with pytest.raises(ValueError, match="'none', 'sum', 'mean', 'weighted_mean'.*'avg'"):
            bce(jnp.zeros(3), jnp.zeros(3), reduction="avg")

    @pytest.mark.parametrize("axis", [2, -3, (0, 0), 1.5])
    def test_bad_axis(self, axis):
        with pytest.raises((ValueError, TypeError), match="axis"):
            bce(jnp.zeros((2, 3)), jnp.zeros((2, 3)), axis=axis)

    @pytest.mark.parametrize("eps", ["0.1", 0.1j])
    def test_label_smoothing_must_be_a_real_number(self, eps):
        with pytest.raises(TypeError, match="label_smoothing must be a real number"):
            bce(jnp.zeros(3), jnp.zeros(3), label_smoothing=eps)

    def test_ignore_index_must_be_a_real_scalar(self):
        with pytest.raises(TypeError, match="ignore_index must be a real number"):
            bce(jnp.zeros(3), jnp.zeros(3), ignore_index="x")
        with pytest.raises(ValueError, match="ignore_index must be a scalar"):
            bce(jnp.zeros(3), jnp.zeros(3), ignore_index=[1, 2])

    @pytest.mark.parametrize("eps", [-0.1, 1.5])
    def test_label_smoothing_out_of_range(self, eps):
        with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\]"):
            bce(jnp.zeros(3), jnp.zeros(3), label_smoothing=eps)

    def test_integer_logits_are_a_type_error(self):
        with pytest.raises(TypeError, match="logits must be a real floating-point array.*int32"):
            bce(jnp.zeros(3, jnp.int32), jnp.zeros(3))

    @pytest.mark.parametrize("labels", [jnp.zeros(3, jnp.complex64), np.array(["a", "b", "c"])])
    def test_complex_or_non_numeric_labels(self, labels):
        with pytest.raises(TypeError, match="labels must be bool, integer or real"):
            bce(jnp.zeros(3), labels)

    def test_non_bool_where(self):
        with pytest.raises(TypeError, match="where must be a boolean array"):
            bce(jnp.zeros(3), jnp.zeros(3), where=jnp.ones(3))

    def test_errors_raise_at_trace_time_under_jit(self):
        f = jax.jit(lambda z, y: bce(z, y))
        with pytest.raises(ValueError, match="labels"):
            f.trace(jnp.zeros((4, 1)), jnp.zeros(4))

    def test_binary_cross_entropy_errors_name_probs(self):
        with pytest.raises(ValueError, match=r"shape of probs"):
            jaxbce.binary_cross_entropy(jnp.zeros((4, 1)), jnp.zeros(4))
        with pytest.raises(TypeError, match="probs must be"):
            jaxbce.binary_cross_entropy(jnp.zeros(3, jnp.int32), jnp.zeros(3))


class TestTransforms:
    def test_jit_vmap_nested_vmap_agree(self):
        z, y = rng_inputs((3, 4, 5), seed=10)
        per_row = lambda zz, yy: bce(zz, yy)  # noqa: E731
        eager = np.array([[per_row(z[i, j], y[i, j]) for j in range(4)] for i in range(3)])
        vv = jax.jit(jax.vmap(jax.vmap(per_row)))(z, y)
        np.testing.assert_allclose(vv, eager, rtol=1e-6)
        np.testing.assert_allclose(vv, bce(z, y, axis=-1), rtol=1e-6)

    def test_grad_value_and_grad_jvp_agree(self):
        z, y = rng_inputs((16,), seed=11)
        z, y = jnp.asarray(z), jnp.asarray(y)
        v, g = jax.value_and_grad(bce)(z, y)
        np.testing.assert_allclose(g, (jax.nn.sigmoid(z) - y) / z.size, rtol=1e-5, atol=1e-9)
        t = jnp.linspace(-1.0, 1.0, 16)
        p_out, t_out = jax.jvp(lambda zz: bce(zz, y), (z,), (t,))
        np.testing.assert_allclose(p_out, v, rtol=1e-7)
        np.testing.assert_allclose(t_out, jnp.vdot(g, t), rtol=1e-5)
        t_jit = jax.jit(lambda zz, tt: jax.jvp(lambda a: bce(a, y), (zz,), (tt,)))(z, t)
        np.testing.assert_allclose(t_jit[1], t_out, rtol=1e-6)
        t_of_jit = jax.jvp(jax.jit(lambda zz: bce(zz, y)), (z,), (t,))
        np.testing.assert_allclose(t_of_jit[1], t_out, rtol=1e-6)

    def test_hessian_is_diagonal_sigmoid_times_sigmoid(self):
        z = jnp.array([-3.0, 0.0, 0.5, 8.0])
        y = jnp.array([0.0, 1.0, 0.3, 1.0])
        pw = jnp.array([2.0, 2.0, 2.0, 2.0])
        h = jax.hessian(lambda zz: bce(zz, y, pos_weight=pw, reduction="sum"))(z)
        z64 = np.asarray(z, np.float64)
        s, sn = 1 / (1 + np.exp(-z64)), 1 / (1 + np.exp(z64))
        np.testing.assert_allclose(h, np.diag(s * sn * (1 + (pw - 1) * y)), rtol=1e-5)

    def test_no_retrace_for_repeated_shapes(self):
        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(z, y):
            return jax.value_and_grad(bce)(z, y, pos_weight=jnp.float32(2.0))

        for seed in range(3):
            z, y = rng_inputs((32,), seed=seed)
            step(z, y)

    @pytest.mark.standard_promotion
    def test_inside_a_jitted_optax_step(self):
        r = np.random.default_rng(12)
        x = r.standard_normal((64, 3)).astype(np.float32)
        y = (x @ np.array([2.0, -1.0, 0.5]) > 0).astype(np.float32)
        opt = optax.adam(0.1)
        params = jnp.zeros(3)
        state = opt.init(params)

        @jax.jit
        def step(params, state):
            loss, g = jax.value_and_grad(lambda p: bce(x @ p, y))(params)
            updates, state = opt.update(g, state)
            return optax.apply_updates(params, updates), state, loss

        first = None
        for _ in range(50):
            params, state, loss = step(params, state)
            first = loss if first is None else first
        assert loss < 0.25 * first

    def test_sharded_mean_equals_unsharded_on_8_devices(self):
        code = textwrap.dedent("""
            import jax, jax.numpy as jnp, numpy as np
            from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
            import jaxbce
            assert len(jax.devices()) == 8, jax.devices()
            r = np.random.default_rng(0)
            z = (r.standard_normal((64, 6)) * 3).astype(np.float32)
            y = (r.uniform(size=(64, 6)) > 0.5).astype(np.float32)
            pw = np.linspace(1, 3, 6).astype(np.float32)
            f = jax.jit(jax.value_and_grad(
                lambda z, y: jaxbce.binary_cross_entropy_with_logits(z, y, pos_weight=pw)))
            v0, g0 = f(z, y)
            mesh = Mesh(np.array(jax.devices()), ("data",))
            sh = NamedSharding(mesh, P("data"))
            v1, g1 = f(jax.device_put(z, sh), jax.device_put(y, sh))
            assert len(g1.sharding.device_set) == 8
            np.testing.assert_allclose(v1, v0, rtol=1e-6)
            np.testing.assert_allclose(g1, g0, rtol=1e-6)
            print("OK")
        """)
        env = dict(
            os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


class TestIdentitiesAndDropIns:
    def test_equals_two_class_softmax_cross_entropy_on_zero_and_z(self):
        z, y = rng_inputs((50,), seed=13)
        two = jnp.stack([jnp.zeros_like(z), jnp.asarray(z)], axis=-1)
        ce = optax.softmax_cross_entropy(two, jnp.stack([1 - y, y], axis=-1))
        np.testing.assert_allclose(bce(z, y, reduction="none"), ce, rtol=2e-6, atol=1e-7)

    def test_sigmoid_binary_cross_entropy_is_an_optax_drop_in(self):
        z, y = rng_inputs((4, 9), seed=14)
        ours = jaxbce.sigmoid_binary_cross_entropy(z, y)
        theirs = optax.losses.sigmoid_binary_cross_entropy(z, y)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)

    def test_sigmoid_binary_cross_entropy_is_finite_where_optax_is_nan(self):
        z = jnp.array([jnp.inf, -jnp.inf])
        y = jnp.array([1.0, 0.0])
        assert np.all(np.isnan(optax.losses.sigmoid_binary_cross_entropy(z, y)))
        np.testing.assert_array_equal(jaxbce.sigmoid_binary_cross_entropy(z, y), [0.0, 0.0])


class TestBinaryCrossEntropyOnProbs:
    def test_values_match_float64_and_clamp(self):
        p = np.array([0.0, 1e-8, 0.3, 0.999, 1.0], np.float32)
        y = np.array([1.0, 0.0, 0.4, 1.0, 0.0], np.float32)
        p64 = p.astype(np.float64)
        with np.errstate(divide="ignore"):
            want = -(y * np.maximum(np.log(p64), -100) + (1 - y) * np.maximum(np.log1p(-p64), -100))
        got = jaxbce.binary_cross_entropy(p, y, reduction="none")
        np.testing.assert_allclose(got, want, rtol=2e-6)
        assert got[0] == 100 and got[-1] == 100

    def test_gradient_is_finite_at_zero_and_one(self):
        p = jnp.array([0.0, 1.0, 0.0, 1.0, 0.25])
        y = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0])
        g = jax.grad(lambda pp: jaxbce.binary_cross_entropy(pp, y, reduction="sum"))(p)
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g[4], (0.25 - 1) / (0.25 * 0.75), rtol=1e-6)

    def test_matches_logits_version_through_sigmoid_in_safe_range(self):
        z, y = rng_inputs((40,), seed=15)
        z = np.clip(z, -8, 8)
        np.testing.assert_allclose(
            jaxbce.binary_cross_entropy(jax.nn.sigmoid(z), y), bce(z, y), rtol=1e-5
        )

    def test_options(self):
        r = np.random.default_rng(16)
        p = r.uniform(0.01, 0.99, size=(4, 3)).astype(np.float32)
        y = (r.uniform(size=(4, 3)) > 0.5).astype(np.float32)
        w = np.array([1.0, 2.0, 0.5], np.float32)
        mask = r.uniform(size=(4, 3)) > 0.2
        per = -(y * np.log(p.astype(np.float64)) + (1 - y) * np.log1p(-p.astype(np.float64)))
        got = jaxbce.binary_cross_entropy(p, y, weight=w, where=mask, axis=0)
        want = np.where(mask, per * w, 0).sum(0) / mask.sum(0)
        np.testing.assert_allclose(got, want, rtol=1e-5)


class TestPosWeightFromLabels:
    def test_counts_per_class_and_is_safe_without_positives(self):
        y = jnp.array([[1, 0, 1], [0, 0, 1], [0, 0, 0], [0, 0, 1]])
        np.testing.assert_allclose(jaxbce.pos_weight_from_labels(y), [3.0, 1.0, 1 / 3])

    def test_ignores_missing_labels_and_caps(self):
        y = jnp.array([[1, -1], [0, 1], [0, -1], [-1, 0]])
        w = jaxbce.pos_weight_from_labels(y, ignore_index=-1)
        np.testing.assert_allclose(w, [2.0, 1.0])
        np.testing.assert_allclose(
            jaxbce.pos_weight_from_labels(y, ignore_index=-1, max_weight=1.5), [1.5, 1.0]
        )


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    z=st.lists(
        st.floats(-1.0000000150474662e30, 1.0000000150474662e30, width=32, allow_subnormal=False),
        min_size=1,
        max_size=8,
    ),
    data=st.data(),
)
def test_property_finite_nonnegative_and_matches_reference(z, data):
    n = len(z)
    unit = st.floats(0, 1, width=32, allow_subnormal=False)
    y = data.draw(st.lists(unit, min_size=n, max_size=n))
    w = data.draw(
        st.lists(st.floats(0, 10, width=32, allow_subnormal=False), min_size=n, max_size=n)
    )
    z, y, w = (np.array(a, np.float32) for a in (z, y, w))
    loss, g = jax.value_and_grad(bce)(z, y, weight=w, reduction="sum")
    assert np.isfinite(loss) and loss >= 0 and np.all(np.isfinite(g))
    # atol: XLA on CPU flushes subnormal results (below 1.18e-38) to zero
    np.testing.assert_allclose(loss, ref_bce(z, y, w=w, reduction="sum"), rtol=1e-5, atol=1e-37)


@pytest.mark.parametrize(
    "dtype, labels, log1p",
    [
        (jnp.float32, jnp.bool_, True),
        (jnp.float32, jnp.float32, True),
        (jnp.bfloat16, jnp.bool_, False),
        (jnp.bfloat16, jnp.int8, False),
        (jnp.float16, jnp.float32, False),
    ],
)
def test_gpu_lowering_uses_xla_log1p_only_for_32_bit_logits(dtype, labels, log1p):
    """Lowered for a GPU (none needed): 16-bit logits take the polynomial log1p and
    1 / (1 + e) from rsqrt; 32-bit logits XLA's log1p and a division."""
    z = jax.ShapeDtypeStruct((4096,), dtype)
    y = jax.ShapeDtypeStruct((4096,), labels)
    f = jax.value_and_grad(lambda z, y: jaxbce.binary_cross_entropy_with_logits(z, y))
    text = jax.jit(f).trace(z, y).lower(lowering_platforms=("cuda",)).as_text()
    assert ("log_plus_one" in text) == log1p
    assert ("rsqrt" in text) == (not log1p)
    assert "optimization_barrier" in text


class TestCompiledMemory:
    """On CPU the compiled value_and_grad of the mean holds no N-sized temporary: the
    loss's reduction fusion and the gradient's loop fusion each convert the logits and
    labels they read, so no conversion is materialized. (Pinned to the CPU.)"""

    N = 1 << 16

    @staticmethod
    def temp_per_element(logits_dtype, labels_dtype, **options):
        n = TestCompiledMemory.N
        z = jax.ShapeDtypeStruct((n // 256, 256), logits_dtype)
        y = jax.ShapeDtypeStruct((n // 256, 256), labels_dtype)
        f = jax.value_and_grad(lambda z, y: bce(z, y, **options))
        cpu = jax.local_devices(backend="cpu")[0]
        with jax.default_device(cpu):
            compiled = jax.jit(f).lower(z, y).compile()
        return compiled.memory_analysis().temp_size_in_bytes / n

    @pytest.mark.parametrize(
        "logits, labels",
        [
            (jnp.float32, jnp.float32),
            (jnp.float32, jnp.int8),
            (jnp.float32, jnp.uint8),
            (jnp.bfloat16, jnp.float32),
            (jnp.bfloat16, jnp.int8),
        ],
    )
    def test_no_n_sized_temporary(self, logits, labels):
        assert self.temp_per_element(logits, labels) <= 0.01

    @pytest.mark.parametrize("logits", [jnp.float32, jnp.bfloat16])
    def test_bool_labels_cost_one_byte(self, logits):
        """XLA:CPU's reduction fusion (YNNPACK) reads no bool array: the labels' sign is
        written as one byte per element first, a quarter of float32 labels' 4 bytes."""
        assert self.temp_per_element(logits, jnp.bool_) <= 1.01

    def test_options_with_float32_labels(self):
        pw = jnp.full(256, 2.0)
        assert self.temp_per_element(jnp.float32, jnp.float32, pos_weight=pw) <= 0.01
        assert self.temp_per_element(jnp.float32, jnp.float32, weight=pw) <= 0.01
