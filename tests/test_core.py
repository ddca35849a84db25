"""Tests of the custom_jvp kernels in jaxbce/_core.py: the rule, its derivatives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jax.test_util import check_grads
from reference import f64
from reference import sigmoid as sigmoid64
from reference import softplus as softplus64

import jaxbce
from jaxbce import _core

Z = jnp.array([-30.0, -4.0, -0.7, 0.0, 0.3, 2.5, 12.0, 40.0])
Y = jnp.array([0.0, 1.0, 0.3, 1.0, 0.0, 0.8, 1.0, 0.0])
PW = jnp.array([0.5, 2.0, 3.0, 1.0, 4.0, 0.7, 2.0, 1.5])


def test_custom_rule_is_in_the_jaxpr():
    jaxpr = jax.make_jaxpr(lambda z: jaxbce.binary_cross_entropy_with_logits(z, Y))(Z)
    assert "custom_jvp_call" in str(jaxpr)


def test_gradient_is_the_rules_not_autodiff_of_the_primal():
    # Autodiff of log1p(exp(-|z|)) + max(z, 0) + ... gives sigmoid(z) - 1 for y = 1, which
    # cancels to 0 for z >= 17; the rule returns -sigmoid(-z) exactly.
    z = jnp.array([17.0, 20.0, 40.0, 80.0])
    g = jax.grad(lambda zz: jnp.sum(_core.bce_with_logits(zz, jnp.ones(4), None)))(z)
    np.testing.assert_allclose(g, -sigmoid64(-f64(z)), rtol=4e-7)
    assert np.all(g < 0)


def test_derivatives_against_float64_formulas():
    z, y, pw = f64(Z), f64(Y), f64(PW)
    gz, gy, gpw = jax.grad(lambda a, b, c: jnp.sum(_core.bce_with_logits(a, b, c)), (0, 1, 2))(
        Z, Y, PW
    )
    np.testing.assert_allclose(
        gz, (1 - y) * sigmoid64(z) - pw * y * sigmoid64(-z), rtol=2e-6, atol=1e-30
    )
    np.testing.assert_allclose(gy, pw * softplus64(-z) - softplus64(z), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(gpw, y * softplus64(-z), rtol=2e-6, atol=1e-30)
    # without pos_weight the label derivative is exactly -z
    gy1 = jax.grad(lambda b: jnp.sum(_core.bce_with_logits(Z, b, None)))(Y)
    np.testing.assert_array_equal(gy1, -Z)


@pytest.mark.parametrize("pw", [None, PW])
def test_check_grads_order_2(pw):
    z = Z[2:7]  # keep |z| moderate: finite differences in float32
    y = Y[2:7]
    args = (z, y) if pw is None else (z, y, pw[2:7])

    def f(*a):
        return _core.bce_with_logits(a[0], a[1], None if pw is None else a[2])

    check_grads(f, args, order=2, modes=["fwd", "rev"], atol=2e-2, rtol=2e-2, eps=1e-2)


def test_second_derivative_exact_including_zero():
    for pw in (None, PW):
        h = jax.vmap(
            jax.grad(jax.grad(lambda a, b, c: _core.bce_with_logits(a, b, c))),
            in_axes=(0, 0, None if pw is None else 0),
        )(Z, Y, pw)
        c = 1.0 if pw is None else 1 + (f64(pw) - 1) * f64(Y)
        np.testing.assert_allclose(h, sigmoid64(Z) * sigmoid64(-f64(Z)) * c, rtol=3e-6, atol=1e-30)
    h0 = jax.grad(jax.grad(lambda a: _core.bce_with_logits(a, jnp.float32(1.0), None)))(0.0)
    assert h0 == 0.25


def test_mixed_second_derivative_logits_labels():
    # d2/dz dy of the loss is -sigmoid(-z) * pw - ... : for pw None it is -1 everywhere
    d = jax.vmap(jax.grad(jax.grad(lambda a, b: _core.bce_with_logits(a, b, None), 0), 1))(Z, Y)
    np.testing.assert_allclose(d, -np.ones(8), rtol=1e-6)


def test_loss_and_gradient_share_one_log1p_in_compiled_code():
    # value_and_grad compiles to a single log1p per element (the rule's own loss call and
    # the unused label-derivative terms are eliminated), whatever is differentiated.
    def loss(z, y):
        return jnp.sum(_core.bce_with_logits(z, y, None))

    for argnums in [0, (0, 1)]:
        hlo = jax.jit(jax.value_and_grad(loss, argnums)).lower(Z, Y).compile().as_text()
        assert hlo.count("log-plus-one(") == 1, hlo


def test_bce_on_probs_rule():
    p = jnp.array([0.0, 1e-3, 0.5, 0.99, 1.0])
    y = jnp.array([1.0, 0.0, 0.3, 1.0, 0.0])
    gp, gy = jax.grad(lambda a, b: jnp.sum(_core.bce_on_probs(a, b)), (0, 1))(p, y)
    pf, yf = f64(p), f64(y)
    want = (pf - yf) / np.maximum(pf * (1 - pf), 1e-12)
    np.testing.assert_allclose(gp, want, rtol=1e-5)
    with np.errstate(divide="ignore"):
        want_y = np.maximum(np.log1p(-pf), -100) - np.maximum(np.log(pf), -100)
    np.testing.assert_allclose(gy, want_y, rtol=1e-5)
    check_grads(
        lambda a: _core.bce_on_probs(a, y[1:4]),
        (p[1:4],),
        order=2,
        modes=["rev"],
        eps=1e-4,
        rtol=5e-2,
        atol=5e-2,
    )


@pytest.mark.parametrize("key", list(_core.FORMULATIONS))
def test_every_table_entry_has_its_kernel(key):
    """kernel_for picks the kernel made from the table entry of its (hard, narrow)."""
    hard, narrow = key
    kernel = _core.kernel_for(hard, narrow)
    assert kernel is _core.KERNELS[key]
    assert kernel.__name__ == "bce_" + _core.FORMULATIONS[key].name.replace("-", "_")
    # Lowered for a GPU, the kernel's value_and_grad holds the formulation's ops: the
    # polynomial log1p (no log-plus-one) and rsqrt for 16-bit logits only.
    z = jnp.linspace(-5.0, 5.0, 64)
    y = jnp.ones(64) if hard else jnp.full(64, 0.3)
    f = jax.value_and_grad(lambda z: jnp.sum(kernel(z, y, None)))
    text = jax.jit(f).trace(z).lower(lowering_platforms=("cuda",)).as_text()
    assert ("log_plus_one" in text) is not narrow
    assert ("rsqrt" in text) is narrow


@pytest.mark.parametrize("key", list(_core.FORMULATIONS))
def test_gpu_loss_and_gradient_share_no_exp(key):
    """Lowered for a GPU and after CSE (as XLA does before fusing), the value_and_grad of
    every kernel holds two ``exp`` ops, the loss's and the gradient's: a shared one is a
    producer that XLA's fusion cost model may write out as an N-sized array (16-bit
    logits on an H200) or compute in a second kernel (float32 logits on a B200) on a
    device with more memory bandwidth (docs/performance.md). ``benchmarks/fusion.py``
    checks the compiled kernels themselves, and that the machine code computes one."""
    from jax._src.interpreters import mlir
    from jaxlib.mlir import ir, passmanager

    hard, narrow = key
    kernel = _core.KERNELS[key]
    z = jnp.linspace(-5.0, 5.0, 64, dtype=jnp.bfloat16 if narrow else jnp.float32)
    y = jnp.ones(64, bool) if hard else jnp.full(64, 0.3)
    f = jax.value_and_grad(lambda z: jnp.sum(kernel(z, y, None)))
    text = jax.jit(f).trace(z).lower(lowering_platforms=("cuda",)).as_text()
    with mlir.make_ir_context():
        module = ir.Module.parse(text)
        passes = "builtin.module(inline,canonicalize,cse)"
        passmanager.PassManager.parse(passes).run(module.operation)
        text = str(module)
    assert text.count("stablehlo.exponential") == 2


@pytest.mark.parametrize("key", list(_core.KERNELS))
def test_every_kernel_is_the_cpu_formulation_on_cpu(key):
    """On CPU every kernel computes the CPU formulation: identical values and derivatives
    for hard labels. (Pinned to the CPU: on a GPU the kernels differ, test_accuracy.py.)"""
    kernel = _core.KERNELS[key]
    cpu = jax.local_devices(backend="cpu")[0]
    z = jax.device_put(np.random.default_rng(3).normal(0, 4, 256).astype(np.float32), cpu)
    y = jax.device_put((np.arange(256) % 3 == 0).astype(np.float32), cpu)
    for pw in (None, jax.device_put(np.full(256, 2.5, np.float32), cpu)):
        f = jax.jit(
            jax.value_and_grad(lambda z, k, pw=pw: jnp.sum(k(z, y, pw)), argnums=0),
            static_argnums=1,
        )
        v, g = f(z, kernel)
        v0, g0 = f(z, _core.bce_with_logits)
        assert g.devices() == {cpu}
        np.testing.assert_array_equal(v, v0)
        np.testing.assert_array_equal(g, g0)
        np.testing.assert_allclose(
            v, np.sum(reference.bce(z, y, 1.0 if pw is None else 2.5)), rtol=1e-6
        )
