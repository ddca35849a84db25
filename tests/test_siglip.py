"""Tests of jaxbce/_siglip.py: SigLIP's pairwise sigmoid loss without its logits.

The reference is the dense loss in float64 (``reference.bce`` on the materialized
``[B, B]`` logits, label 1 on the diagonal). Errors are measured as the largest error
over the largest reference value of each output: float32 inputs agree to a few float32
eps (the logits' matmul is float32), bfloat16 inputs to bfloat16 rounding in ``dx`` and
``dy`` only, since ``p - y`` is cast to bfloat16 for those two matmuls.

The ring runs in subprocesses: 8 simulated CPU devices, and 2 processes of 4 devices
joined by ``jax.distributed``. Both run this file as a script (``python
tests/test_siglip.py ring|process ...``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbce

HERE = Path(__file__).resolve()
TIMEOUT = 240


def inputs(batch, dim, dtype=np.float32, seed=0):
    """Unit-norm embeddings whose positives are similar: a realistic spread of logits."""
    r = np.random.default_rng(seed)
    x = r.normal(size=(batch, dim))
    y = x + 0.7 * r.normal(size=(batch, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return jnp.asarray(x, dtype), jnp.asarray(y, dtype)


def dense_reference(x, y, scale, bias):
    """The loss and its gradients w.r.t. x, y, scale and bias in float64, from the
    ``[B, B]`` logits."""
    import reference  # tests/reference.py

    x, y = (np.asarray(a).astype(np.float64) for a in (x, y))
    m = x @ y.T
    z = float(scale) * m + float(bias)
    labels = np.eye(len(x))
    dz = reference.bce_grad(z, labels)[0] / len(x)
    loss = reference.bce(z, labels).sum() / len(x)
    return loss, (scale * dz @ y, scale * dz.T @ x, np.sum(dz * m), np.sum(dz))


def value_and_grads(x, y, scale, bias, **kw):
    fn = jax.value_and_grad(lambda *a: jaxbce.siglip_loss(*a, **kw), argnums=(0, 1, 2, 3))
    return fn(x, y, jnp.float32(scale), jnp.float32(bias))


def relative_errors(got, want):
    """``|got - want|`` over ``|want|``, the largest of each output (loss, dx, dy,
    dscale, dbias)."""
    (v, g), (rv, rg) = got, want
    errs = [abs(float(v) - rv) / abs(rv)]
    for a, r in zip(g, rg, strict=True):
        a = np.asarray(a).astype(np.float64)
        errs.append(float(np.max(np.abs(a - r)) / np.max(np.abs(r))))
    return np.array(errs)


def equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (scan bodies, custom rules)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)


def temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


# ----------------------------------------------------------------------------- values


class TestAgainstDenseReference:
    @pytest.mark.parametrize(
        "batch, dim, chunk",
        [(256, 64, None), (300, 32, 128), (97, 16, 10), (64, 8, 64), (5, 3, 1)],
        ids=["default-chunk", "overlapping-last-block", "odd", "one-block", "chunk-1"],
    )
    def test_float32_equals_float64_dense_to_rounding(self, batch, dim, chunk):
        x, y = inputs(batch, dim)
        got = value_and_grads(x, y, 10.0, -10.0, chunk_size=chunk)
        errs = relative_errors(got, dense_reference(x, y, 10.0, -10.0))
        assert np.all(errs < [1e-6, 4e-6, 4e-6, 1e-6, 1e-6]), errs

    def test_bfloat16_inputs_round_only_dx_and_dy(self):
        x, y = inputs(300, 32, jnp.bfloat16)
        v, g = got = value_and_grads(x, y, 10.0, -10.0, chunk_size=128)
        assert v.dtype == jnp.float32
        assert [a.dtype for a in g] == [jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.float32]
        errs = relative_errors(got, dense_reference(x, y, 10.0, -10.0))
        # products of bfloat16 are exact in float32: the logits are as good as float32's
        assert np.all(errs < [1e-6, 1e-2, 1e-2, 1e-6, 1e-6]), errs
        assert np.all(errs[1:3] > 1e-4)  # and dz really was rounded to bfloat16

    @staticmethod
    def float64_errors():
        with jax.enable_x64(True):
            x, y = inputs(40, 8, np.float64)
            fn = jax.value_and_grad(jaxbce.siglip_loss, argnums=(0, 1, 2, 3))
            got = fn(x, y, jnp.float64(3.0), jnp.float64(1.0))
            assert got[0].dtype == jnp.float64 and got[1][2].dtype == jnp.float64
        return relative_errors(got, dense_reference(x, y, 3.0, 1.0))

    def test_float64_inputs_compute_in_float64(self):
        errs = self.float64_errors()
        assert errs[0] < 1e-14 and np.all(errs[1:] < 1e-7), errs

    def test_float64_gradients_to_float64_rounding(self):
        assert np.all(self.float64_errors()[1:] < 1e-12)

    def test_doctest_value_by_hand(self):
        x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
        # logits [[1, -1], [-1, 1]]: each positive and each negative costs softplus(-1)
        loss = jaxbce.siglip_loss(x, x, 2.0, -1.0)
        np.testing.assert_allclose(loss, 4 * np.log1p(np.exp(-1.0)) / 2, rtol=1e-7)

    @pytest.mark.parametrize("scale, bias", [(1e4, -1e3), (1e4, 1e3), (1e4, 0.0), (1e-4, -1e3)])
    def test_finite_and_accurate_at_extreme_scale_and_bias(self, scale, bias):
        x, y = inputs(200, 16, seed=1)
        got = value_and_grads(x, y, scale, bias, chunk_size=64)
        v, g = got
        assert np.isfinite(v) and all(np.all(np.isfinite(a)) for a in g)
        errs = relative_errors(got, dense_reference(x, y, scale, bias))
        # at scale 1e4 the float32 rounding of x . y moves a logit by up to ~1e-3
        assert np.all(errs < [1e-6, 1e-5, 1e-5, 1e-6, 1e-6]), errs

    def test_nan_in_gives_nan_out(self):
        x, y = inputs(20, 4)
        v, g = value_and_grads(x.at[3, 1].set(jnp.nan), y, 10.0, -10.0, chunk_size=8)
        assert np.isnan(v) and np.isnan(g[2]) and np.isnan(g[3])
        assert np.isnan(g[0][3]).all() and np.isnan(g[1]).all()
        v, _ = value_and_grads(x, y, jnp.nan, -10.0)
        assert np.isnan(v)

    def test_integer_scale_and_bias_are_accepted_and_not_differentiated(self):
        x, y = inputs(16, 4)
        want = jaxbce.siglip_loss(x, y, 5.0, -2.0)
        np.testing.assert_allclose(jaxbce.siglip_loss(x, y, 5, jnp.int32(-2)), want, rtol=1e-7)


# ------------------------------------------------------------------ how it is computed


class TestOnePass:
    def grad_jaxpr(self, argnums, batch=512):
        x, y = inputs(batch, 16)
        fn = jax.value_and_grad(lambda *a: jaxbce.siglip_loss(*a, chunk_size=128), argnums=argnums)
        return jax.make_jaxpr(fn)(x, y, jnp.float32(10.0), jnp.float32(-10.0))

    @pytest.mark.parametrize(
        "argnums, dots",
        [((0, 1, 2, 3), 3), ((0,), 2), ((1,), 2), ((2, 3), 1)],
        ids=["all", "x", "y", "scale-bias"],
    )
    def test_three_matmuls_at_most_and_no_recomputation(self, argnums, dots):
        """The forward pass makes the wanted gradients; the backward pass multiplies
        them by the cotangent: no matmul outside the one pass over the pairs."""
        jaxpr = self.grad_jaxpr(argnums)
        names = [e.primitive.name for e in equations(jaxpr.jaxpr)]
        assert names.count("dot_general") == dots

    def test_value_alone_is_one_matmul(self):
        x, y = inputs(512, 16)
        jaxpr = jax.make_jaxpr(lambda *a: jaxbce.siglip_loss(*a, chunk_size=128))(
            x, y, jnp.float32(1.0), jnp.float32(0.0)
        )
        names = [e.primitive.name for e in equations(jaxpr.jaxpr)]
        assert "custom_vjp_call" in names and names.count("dot_general") == 1

    def test_no_array_holds_the_pairs(self):
        batch = 512
        for eqn in equations(self.grad_jaxpr((0, 1, 2, 3), batch).jaxpr):
            for v in eqn.outvars:
                assert np.prod(getattr(v.aval, "shape", ())) < batch * batch // 2, eqn

    def test_temporaries_grow_linearly_in_the_batch(self):
        """Fixed chunk: temporaries ~ B * (chunk + D); the logits would grow as B^2."""
        dim, chunk = 32, 128
        temps = {}
        for batch in (512, 1024, 2048, 4096):
            x = jax.ShapeDtypeStruct((batch, dim), jnp.float32)
            s = jax.ShapeDtypeStruct((), jnp.float32)
            fn = jax.value_and_grad(
                lambda *a: jaxbce.siglip_loss(*a, chunk_size=chunk), argnums=(0, 1, 2, 3)
            )
            temps[batch] = temp_bytes(fn, x, x, s, s)
        assert temps[4096] <= 8.5 * temps[512], temps  # linear: 8x; quadratic: 64x

        def materialized(x, y, s, b):
            logits = s * x @ y.T + b
            eye = jnp.eye(4096, dtype=bool)
            return jaxbce.binary_cross_entropy_with_logits(logits, eye, reduction="sum") / 4096

        fn = jax.value_and_grad(materialized, argnums=(0, 1, 2, 3))
        dense = temp_bytes(fn, *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, x, s, s)))
        assert temps[4096] < dense / 10, (temps, dense)

    def test_default_chunk_keeps_temporaries_bounded_as_the_batch_grows(self):
        dim = 32
        temps = {}
        for batch in (4096, 8192):
            x = jax.ShapeDtypeStruct((batch, dim), jnp.float32)
            s = jax.ShapeDtypeStruct((), jnp.float32)
            fn = jax.value_and_grad(jaxbce.siglip_loss, argnums=(0, 1, 2, 3))
            temps[batch] = temp_bytes(fn, x, x, s, s)
        assert temps[8192] < 1.3 * temps[4096], temps  # the block stays the same size
        assert temps[8192] < 8192 * 8192 * 4 / 8, temps  # an eighth of one f32 [B, B]

    def test_jit_vmap_and_the_python_call_agree(self):
        x, y = inputs(24, 4)
        s, b = jnp.float32(4.0), jnp.float32(-2.0)
        eager = jaxbce.siglip_loss(x, y, s, b, chunk_size=7)
        np.testing.assert_allclose(jax.jit(jaxbce.siglip_loss)(x, y, s, b), eager, rtol=1e-6)
        xs, ys = jnp.stack([x, y]), jnp.stack([y, x])
        batched = jax.vmap(lambda x, y: jaxbce.siglip_loss(x, y, s, b, chunk_size=7))(xs, ys)
        np.testing.assert_allclose(batched[0], eager, rtol=1e-6)
        np.testing.assert_allclose(batched[1], jaxbce.siglip_loss(y, x, s, b), rtol=1e-6)


# ---------------------------------------------------------------------------- checks


class TestBadInput:
    x = np.ones((4, 3), np.float32)

    @pytest.mark.parametrize(
        "args, error, match",
        [
            ((x, np.ones((4, 2), np.float32), 1.0, 0.0), ValueError, r"y must have the shape"),
            ((x, np.ones((5, 3), np.float32), 1.0, 0.0), ValueError, r"x shape \(4, 3\)"),
            ((np.ones(4, np.float32),) * 2 + (1.0, 0.0), ValueError, r"x must be a 2-D"),
            ((np.ones((2, 2, 2), np.float32),) * 2 + (1.0, 0.0), ValueError, "x must be a 2-D"),
            ((np.ones((4, 3), np.int32), x, 1.0, 0.0), TypeError, r"x must be a real float"),
            ((x, np.ones((4, 3), bool), 1.0, 0.0), TypeError, r"y must be a real float"),
            ((x, x.astype(np.float16), 1.0, 0.0), TypeError, r"same dtype; got x float32"),
            ((x, x, np.ones(1, np.float32), 0.0), ValueError, r"scale must be a scalar"),
            ((x, x, 1.0, np.zeros((2, 2))), ValueError, r"bias must be a scalar; got shape"),
            ((x, x, "1", 0.0), TypeError, r"scale must be a real number"),
            ((x, x, 1.0, True), TypeError, r"bias must be a real number"),
            ((np.ones((0, 3), np.float32),) * 2 + (1.0, 0.0), ValueError, "at least one row"),
        ],
    )
    def test_errors_name_the_argument(self, args, error, match):
        with pytest.raises(error, match=match):
            jaxbce.siglip_loss(*args)

    @pytest.mark.parametrize("chunk, error", [(0, ValueError), (2.5, TypeError)])
    def test_bad_chunk_size(self, chunk, error):
        with pytest.raises(error, match="chunk_size"):
            jaxbce.siglip_loss(self.x, self.x, 1.0, 0.0, chunk_size=chunk)

    def test_errors_also_under_jit(self):
        with pytest.raises(ValueError, match="scale must be a scalar"):
            jax.jit(jaxbce.siglip_loss)(self.x, self.x, jnp.ones(2), 0.0)


# ------------------------------------------------------------------------------ ring

RING_DEVICES = (1, 2, 4, 8)


def run_script(args, env_extra=None, timeout=TIMEOUT):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {"JAX_PLATFORMS": "cpu"} | (env_extra or {})
    return subprocess.Popen(
        [sys.executable, str(HERE), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc, timeout=TIMEOUT):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ring_results():
    proc = run_script(["ring"], {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    return finish(proc)


class TestRing:
    def test_every_device_count_equals_one_device(self, ring_results):
        want = ring_results["single"]
        for n in RING_DEVICES:
            got = ring_results["ring"][str(n)]
            # The same sum in another order: within a few float32 ulp (0-1 ulp with jax
            # 0.10.2, 2 with 0.12.0.1 for the one-device ring).
            ulp = abs(got["loss"] - want["loss"]) / np.spacing(np.float32(want["loss"]))
            assert ulp <= 4, (n, got["loss"], want["loss"])
            for key in ("dx", "dy", "dscale", "dbias"):
                np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
            assert got["loss_on_every_device"] == [got["loss"]] * n

    def test_ring_equals_the_float64_reference(self, ring_results):
        x, y = ring_inputs()
        loss, grads = dense_reference(x, y, RING_SCALE, RING_BIAS)
        got = ring_results["ring"]["8"]
        np.testing.assert_allclose(got["loss"], loss, rtol=1e-6)
        for key, want in zip(("dx", "dy", "dscale", "dbias"), grads, strict=True):
            err = np.max(np.abs(np.asarray(got[key]) - want)) / np.max(np.abs(want))
            assert err < 4e-6, (key, err)

    def test_per_device_temporaries_stay_flat_as_devices_grow(self, ring_results):
        """Fixed rows per device b: the global batch grows 8x, each device's memory not.
        The ring adds a few [b, D] buffers (the block in flight, its gradient)."""
        temps = {int(n): t for n, t in ring_results["temps"].items()}
        b, d = RING_MEMORY
        assert temps[8] <= 1.05 * temps[4], temps
        assert temps[8] <= temps[1] + 8 * b * d * 4, temps
        assert temps[8] < b * (8 * b) * 4, temps  # below one device's [b, B] logits

    def test_ring_inside_a_larger_jit_with_a_varying_scale(self, ring_results):
        """A scale that differs per device gets its own device's gradient share."""
        got = ring_results["varying_scale"]
        np.testing.assert_allclose(got["dscale"], got["want_dscale"], rtol=1e-5)


@pytest.mark.slow
def test_two_processes_give_the_single_process_loss():
    address = f"127.0.0.1:{free_port()}"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [run_script(["process", address, str(pid)], env) for pid in range(2)]
    try:
        results = [finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    x, y = ring_inputs()
    want = jax.value_and_grad(jaxbce.siglip_loss, argnums=(2, 3))(
        x, y, jnp.float32(RING_SCALE), jnp.float32(RING_BIAS)
    )
    for r in results:
        assert r["devices"] == 8 and r["processes"] == 2
        np.testing.assert_allclose(r["loss"], want[0], rtol=2e-7)
        np.testing.assert_allclose([r["dscale"], r["dbias"]], want[1], rtol=1e-5)
        np.testing.assert_allclose(r["dx_rows"], r["dx_rows_single"], rtol=1e-5, atol=1e-7)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------- the subprocesses (run as script)

RING_BATCH, RING_DIM, RING_CHUNK = 96, 16, 5  # b = 12 rows on 8 devices: 3 chunks, overlap
RING_SCALE, RING_BIAS = 10.0, -10.0
RING_MEMORY = (256, 64)  # b, D for the memory figures


def ring_inputs():
    return inputs(RING_BATCH, RING_DIM, seed=3)


def _sharded_loss(mesh, chunk, argnums=(0, 1, 2, 3)):
    from jax.sharding import PartitionSpec as P

    def loss(x, y, s, b):
        return jaxbce.siglip_loss(x, y, s, b, axis_name="data", chunk_size=chunk)

    spec = (P("data"), P("data"), P(), P())
    ring = jax.shard_map(loss, mesh=mesh, in_specs=spec, out_specs=P())
    return jax.jit(jax.value_and_grad(ring, argnums=argnums))


def _as_lists(v, g):
    names = ("dx", "dy", "dscale", "dbias")
    return {"loss": float(v)} | {k: np.asarray(a).tolist() for k, a in zip(names, g, strict=True)}


def _main_ring():
    """Ring over 1, 2, 4 and 8 of 8 simulated devices: values, gradients, memory."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    x, y = ring_inputs()
    s, b = jnp.float32(RING_SCALE), jnp.float32(RING_BIAS)
    out = {"single": _as_lists(*value_and_grads(x, y, RING_SCALE, RING_BIAS)), "ring": {}}
    out["temps"] = {}
    rows, dim = RING_MEMORY
    for n in RING_DEVICES:
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
        rows_sharding = NamedSharding(mesh, P("data"))
        with jax.set_mesh(mesh):
            xs, ys = (jax.device_put(a, rows_sharding) for a in (x, y))
            v, g = _sharded_loss(mesh, RING_CHUNK)(xs, ys, s, b)
            out["ring"][n] = _as_lists(v, g)
            per_device = [float(np.asarray(sh.data)) for sh in v.addressable_shards]
            out["ring"][n]["loss_on_every_device"] = per_device
            arg = jax.ShapeDtypeStruct((rows * n, dim), jnp.float32, sharding=rows_sharding)
            scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
            compiled = _sharded_loss(mesh, 128).lower(arg, arg, scalar, scalar).compile()
            out["temps"][n] = compiled.memory_analysis().temp_size_in_bytes

    # scale per device (varying): d loss / d scale_k sums over device k's rows only
    mesh = Mesh(np.array(jax.devices()), ("data",))
    scales = jnp.linspace(5.0, 12.0, 8, dtype=jnp.float32)

    def loss(x, y, s, b):
        return jaxbce.siglip_loss(x, y, s[0], b, axis_name="data", chunk_size=RING_CHUNK)

    ring = jax.shard_map(
        loss, mesh=mesh, in_specs=(P("data"), P("data"), P("data"), P()), out_specs=P()
    )
    with jax.set_mesh(mesh):
        sh = NamedSharding(mesh, P("data"))
        dscale = jax.grad(ring, argnums=2)(
            jax.device_put(x, sh), jax.device_put(y, sh), jax.device_put(scales, sh), b
        )

    def dense(scales):
        z = jnp.repeat(scales, RING_BATCH // 8)[:, None] * (x @ y.T) + b
        return (
            jaxbce.binary_cross_entropy_with_logits(
                z, jnp.eye(RING_BATCH, dtype=bool), reduction="sum"
            )
            / RING_BATCH
        )

    out["varying_scale"] = {
        "dscale": np.asarray(dscale).tolist(),
        "want_dscale": np.asarray(jax.grad(dense)(scales)).tolist(),
    }
    print(json.dumps(out))


def _main_process(address, pid):
    """One of 2 processes x 4 devices: the ring over all 8 devices of both."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=2, process_id=pid)
    x, y = ring_inputs()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    local = slice(pid * RING_BATCH // 2, (pid + 1) * RING_BATCH // 2)

    def put(a):
        return jax.make_array_from_process_local_data(sharding, np.asarray(a)[local], a.shape)

    with jax.set_mesh(mesh):
        s = jax.make_array_from_process_local_data(
            NamedSharding(mesh, P()), np.float32(RING_SCALE), ()
        )
        b = jax.make_array_from_process_local_data(
            NamedSharding(mesh, P()), np.float32(RING_BIAS), ()
        )
        v, (dx, ds, db) = _sharded_loss(mesh, RING_CHUNK, argnums=(0, 2, 3))(put(x), put(y), s, b)
    single_dx = jax.grad(jaxbce.siglip_loss)(x, y, jnp.float32(RING_SCALE), jnp.float32(RING_BIAS))
    rows = [sh.index[0] for sh in dx.addressable_shards]
    print(
        json.dumps(
            {
                "devices": jax.device_count(),
                "processes": jax.process_count(),
                "loss": float(np.asarray(v.addressable_shards[0].data)),
                "dscale": float(np.asarray(ds.addressable_shards[0].data)),
                "dbias": float(np.asarray(db.addressable_shards[0].data)),
                "dx_rows": [np.asarray(sh.data).tolist() for sh in dx.addressable_shards],
                "dx_rows_single": [np.asarray(single_dx[r]).tolist() for r in rows],
            }
        )
    )


if __name__ == "__main__":
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    sys.path.insert(0, str(HERE.parent))  # reference.py
    mode, *rest = sys.argv[1:]
    if mode == "ring":
        _main_ring()
    else:
        _main_process(rest[0], int(rest[1]))
    sys.exit(0)
