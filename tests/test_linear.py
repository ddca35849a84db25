"""Tests of linear_binary_cross_entropy: the fused linear + sigmoid BCE.

It must equal jaxbce's loss on the materialized logits ``x @ w + bias`` (values and
gradients, every option, both label forms), hold temporaries that do not grow with the
number of classes, make its gradients with three matmuls, and give the single-device
result when the classes are split over devices.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbce

B, H, C, K = 6, 5, 37, 4  # C = 37 is not a multiple of the chunk of 8
CHUNK = 8


def inputs(seed=0, dtype=np.float32):
    r = np.random.default_rng(seed)
    idx = r.integers(0, C, (B, K)).astype(np.int32)
    idx[0, 1] = idx[0, 0]  # a repeat counts once
    idx[1, 2:] = -1  # padding
    dense = np.zeros((B, C), bool)
    for row, cols in enumerate(idx):
        dense[row, cols[cols >= 0]] = True
    return {
        "x": jnp.asarray(r.standard_normal((B, H)), dtype),
        "w": jnp.asarray(r.standard_normal((H, C)), dtype),
        "bias": jnp.asarray(r.standard_normal(C), dtype),
        "idx": jnp.asarray(idx),
        "dense": jnp.asarray(dense),
        "soft": jnp.asarray(r.uniform(size=(B, C)), np.float32),
        "per_class": jnp.asarray(r.uniform(0.5, 2.0, C), np.float32),
        "per_sample": jnp.asarray(r.uniform(0.5, 2.0, (B, 1)), np.float32),
    }


def materialized(x, w, bias, labels, **options):
    """The reference: jaxbce on the logits in memory."""
    z = x @ w if bias is None else x @ w + bias[None, :]
    return jaxbce.binary_cross_entropy_with_logits(z, labels, **options)


def rel_close(got, want, rtol):
    """Elementwise, relative to the largest entry (a gradient's small entries have the
    absolute error of its large ones)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(np.abs(want).max(), 1e-30))


# Every option, in four combinations that together cover each one; ``diff`` names the
# array options whose gradients are compared too.
CASES = {
    "plain": ({}, ()),
    "pos_weight_per_sample_weight_smoothing_sum": (
        {"pos_weight": "per_class", "weight": "per_sample", "label_smoothing": 0.1},
        ("pos_weight", "weight"),
    ),
    "per_class_weight_rows_no_bias": ({"weight": "per_class", "axis": -1}, ("weight",)),
    "scalar_weight_traced_smoothing_row_pos_weight": (
        {"weight": 1.5, "pos_weight": "per_sample", "label_smoothing": "traced"},
        ("weight", "pos_weight", "label_smoothing"),
    ),
}


def build(case, a):
    options, diff = CASES[case]
    opts = {}
    for key, value in options.items():
        if isinstance(value, str) and value in a:
            opts[key] = a[value]
        elif value == "traced":
            opts[key] = jnp.float32(0.2)
        elif key == "weight" and isinstance(value, float):
            opts[key] = jnp.float32(value)
        else:
            opts[key] = value
    if case.endswith("_sum"):
        opts["reduction"] = "sum"
    bias = None if "no_bias" in case else a["bias"]
    return opts, diff, bias


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("labels", ["bool", "soft", "indices"])
def test_equals_the_loss_on_materialized_logits(case, labels):
    a = inputs()
    opts, diff, bias = build(case, a)
    per_row = opts.get("axis") == -1
    row_ct = jnp.linspace(0.5, 2.0, B, dtype=jnp.float32)  # a cotangent that is not 1

    def scalar(out):
        return jnp.sum(out * row_ct) if per_row else out

    target = a["soft"] if labels == "soft" else a["dense"]
    names = ("x", "w", "bias", "labels", *diff) if bias is not None else ("x", "w", *diff)
    if labels != "soft":
        names = tuple(n for n in names if n != "labels")

    def call(fn, values):
        kw = dict(opts) | dict(zip(names, values, strict=True))
        kw.setdefault("bias", bias)
        x, w, b = kw.pop("x"), kw.pop("w"), kw.pop("bias")
        y = kw.pop("labels", target)
        if fn == "fused":
            if labels == "indices":
                return scalar(
                    jaxbce.linear_binary_cross_entropy(
                        x, w, positive_indices=a["idx"], bias=b, chunk_size=CHUNK, **kw
                    )
                )
            return scalar(
                jaxbce.linear_binary_cross_entropy(x, w, y, bias=b, chunk_size=CHUNK, **kw)
            )
        return scalar(materialized(x, w, b, y, **kw))

    values = [
        {"x": a["x"], "w": a["w"], "bias": bias, "labels": target}.get(n, opts.get(n))
        for n in names
    ]
    argnums = tuple(range(len(values)))
    got = jax.value_and_grad(lambda *v: call("fused", v), argnums)(*values)
    want = jax.value_and_grad(lambda *v: call("ref", v), argnums)(*values)
    assert got[0].dtype == jnp.float32 and got[0].shape == ()
    rel_close(got[0], want[0], 2e-6)
    for name, g, r in zip(names, got[1], want[1], strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        rel_close(g, r, 1e-5)


def test_positive_indices_equal_the_sparse_loss_on_materialized_logits():
    a = inputs(1)
    idx = a["idx"].at[2, 0].set(C + 5).at[3, 1].set(-7)  # out of range: ignored like pad

    def fused(x, w, b):
        return jaxbce.linear_binary_cross_entropy(
            x, w, positive_indices=idx, bias=b, pos_weight=a["per_class"], chunk_size=CHUNK
        )

    def sparse(x, w, b):
        z = x @ w + b[None, :]
        return jaxbce.sparse_binary_cross_entropy_with_logits(z, idx, pos_weight=a["per_class"])

    got = jax.value_and_grad(fused, (0, 1, 2))(a["x"], a["w"], a["bias"])
    want = jax.value_and_grad(sparse, (0, 1, 2))(a["x"], a["w"], a["bias"])
    rel_close(got[0], want[0], 2e-6)
    for g, r in zip(got[1], want[1], strict=True):
        rel_close(g, r, 1e-5)


def test_int_labels_row_vector_weight_default_chunk_and_one_column_blocks():
    a = inputs(2)
    y, weight = a["dense"].astype(jnp.int8), a["per_class"][None, :]
    want = jax.grad(lambda w, v: materialized(a["x"], w, None, y, weight=v), (0, 1))(a["w"], weight)
    for chunk in (None, 1, C):

        def fused(w, v, chunk=chunk):
            return jaxbce.linear_binary_cross_entropy(a["x"], w, y, weight=v, chunk_size=chunk)

        got = jax.grad(fused, (0, 1))(a["w"], weight)
        for g, r in zip(got, want, strict=True):
            rel_close(g, r, 1e-5)


def test_bfloat16_inputs():
    a = inputs(3, dtype=jnp.bfloat16)
    f32 = {k: a[k].astype(jnp.float32) for k in ("x", "w", "bias")}

    def fused(x, w, b):
        return jaxbce.linear_binary_cross_entropy(
            x, w, positive_indices=a["idx"], bias=b, chunk_size=CHUNK
        )

    loss, grads = jax.value_and_grad(fused, (0, 1, 2))(a["x"], a["w"], a["bias"])
    ref, ref_grads = jax.value_and_grad(
        lambda x, w, b: materialized(x, w, b, a["dense"]), (0, 1, 2)
    )(f32["x"], f32["w"], f32["bias"])
    # z accumulates in float32, so the loss is float32-accurate; the gradient block is
    # rounded to bfloat16 (8 bits) for the two backward matmuls.
    assert loss.dtype == jnp.float32
    rel_close(loss, ref, 1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == jnp.bfloat16
        rel_close(g.astype(jnp.float32), r, 2e-2)


# ------------------------------------------------------------------- how it computes


def _count(jaxpr, name):
    """Occurrences of a primitive in a jaxpr and every jaxpr inside it."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _count(sub, name)
    return n


def test_value_and_grad_costs_three_matmuls_and_rows_four():
    a = inputs()

    def loss(x, w, axis=None):
        out = jaxbce.linear_binary_cross_entropy(
            x, w, positive_indices=a["idx"], chunk_size=CHUNK, axis=axis
        )
        return jnp.sum(out)

    def dots(fn):
        return _count(jax.make_jaxpr(fn)(a["x"], a["w"]).jaxpr, "dot_general")

    assert dots(loss) == 1
    assert dots(jax.value_and_grad(loss, (0, 1))) == 3
    assert dots(jax.grad(loss)) == 2  # dw is not made when only x is differentiated
    assert dots(jax.value_and_grad(lambda x, w: loss(x, w, axis=-1), (0, 1))) == 4


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("form", ["indices", "labels", "rows"])
def test_temporaries_do_not_grow_with_the_classes(form):
    b, h, k, chunk = 64, 64, 4, 512
    block = b * chunk * 4
    temps = []
    for c in (16384 + 100, 2 * (16384 + 100)):
        targets = jnp.zeros((b, k), jnp.int32) if form != "labels" else jnp.zeros((b, c), bool)

        def loss(x, w, bias, targets):
            kw = {"labels" if form == "labels" else "positive_indices": targets}
            out = jaxbce.linear_binary_cross_entropy(
                x, w, bias=bias, chunk_size=chunk, axis=-1 if form == "rows" else None, **kw
            )
            return 3.0 * jnp.sum(out)  # a cotangent that is not 1

        args = (jnp.zeros((b, h)), jnp.zeros((h, c)), jnp.zeros(c), targets)
        temps.append(_temp_bytes(jax.value_and_grad(loss, (0, 1, 2)), *args))
        # a few blocks and [B, H] arrays: far less than one [H, C] or [B, C] array
        assert temps[-1] <= 6 * block + 4 * b * h * 4 + 65536, temps
        assert temps[-1] < min(h, b) * c * 4 / 4, temps
    # the same up to XLA's buffer packing, a fraction of one block
    assert abs(temps[1] - temps[0]) <= block / 2, temps


def test_checkpointed_model_jit_and_integer_labels():
    a = inputs(4)
    y = a["dense"].astype(jnp.int32)

    def model(params, x):
        h = jnp.tanh(x @ params["enc"])
        return jaxbce.linear_binary_cross_entropy(h, params["w"], y, bias=params["b"])

    params = {"enc": jnp.eye(H), "w": a["w"], "b": a["bias"]}
    want = jax.grad(model)(params, a["x"])
    got = jax.jit(jax.grad(jax.checkpoint(model)))(params, a["x"])
    for k in params:
        rel_close(got[k], want[k], 1e-6)


def test_forward_mode_is_not_supported():
    a = inputs()
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(
            lambda w: jaxbce.linear_binary_cross_entropy(a["x"], w, a["dense"]),
            (a["w"],),
            (a["w"],),
        )


# ------------------------------------------------------------------------ bad input


def test_bad_inputs_are_named_at_trace_time():
    a = inputs()
    x, w, y, idx = a["x"], a["w"], a["dense"], a["idx"]
    f = jaxbce.linear_binary_cross_entropy
    with pytest.raises(ValueError, match=r"x must be \[B, H\].*\(30,\)"):
        f(x.reshape(-1), w, y)
    with pytest.raises(ValueError, match=r"H = 5 to match x of shape \(6, 5\).*\(4, 37\)"):
        f(x, w[:4], y)
    with pytest.raises(TypeError, match="w must have x's dtype"):
        f(x, w.astype(jnp.bfloat16), y)
    with pytest.raises(TypeError, match="x must be a real floating-point"):
        f(y, w, y)
    with pytest.raises(ValueError, match="exactly one of labels .* got both"):
        f(x, w, y, positive_indices=idx)
    with pytest.raises(ValueError, match="exactly one of labels .* got neither"):
        f(x, w)
    with pytest.raises(ValueError, match=r"labels shape \(6, 36\) and x @ w shape \(6, 37\)"):
        f(x, w, y[:, 1:])
    with pytest.raises(ValueError, match=r"\[B, C\] array.*binary_cross_entropy_with_logits"):
        f(x, w, y, weight=jnp.ones((B, C)))
    with pytest.raises(ValueError, match=r"pos_weight must be a scalar, \[C\].*\(36,\)"):
        f(x, w, y, pos_weight=jnp.ones(C - 1))
    with pytest.raises(ValueError, match=r"bias must be \[C\] with C = 37"):
        f(x, w, y, bias=jnp.ones(C + 1))
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum'"):
        f(x, w, y, reduction="max")
    with pytest.raises(ValueError, match='reduction="none".*binary_cross_entropy_with_logits'):
        f(x, w, y, reduction="none")
    with pytest.raises(ValueError, match="axis must be None .* or -1"):
        f(x, w, y, axis=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int; got 0"):
        f(x, w, y, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be a positive Python int"):
        f(x, w, y, chunk_size=8.0)
    with pytest.raises(TypeError, match="positive_indices must be an integer array"):
        f(x, w, positive_indices=idx.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"positive_indices must have shape \(B, K\)"):
        f(x, w, positive_indices=idx[1:])
    bad = np.asarray(idx).copy()
    bad[0, 0] = C  # NumPy index values are checked before tracing
    with pytest.raises(ValueError, match=r"positive_indices has 1 entries .* \[0, 37\)"):
        f(x, w, positive_indices=bad)
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        f(x, w, y, label_smoothing=1.5)


def test_traced_index_values_are_checked_under_checkify():
    from jax.experimental import checkify

    a = inputs()

    def loss(x, w, idx):
        jaxbce.check_positive_indices(idx, w.shape[1])
        return jaxbce.linear_binary_cross_entropy(x, w, positive_indices=idx)

    checked = jax.jit(checkify.checkify(jax.value_and_grad(loss, (0, 1))))
    err, _ = checked(a["x"], a["w"], a["idx"])
    assert err.get() is None
    err, _ = checked(a["x"], a["w"], a["idx"].at[3, 0].set(C))
    assert "positive_indices has 1 entries neither pad (-1) nor in [0, 37)" in err.get()


# ------------------------------------------------------------------- class-parallel

SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from functools import partial
    from jax.sharding import Mesh, PartitionSpec as P
    import jaxbce
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    n = len(jax.devices()); assert n == 8, jax.devices()
    r = np.random.default_rng(0)
    b, h, c, k = 16, 64, 8 * 1000, 5  # 1000 classes a device: blocks of 128 overlap
    x = jnp.asarray(r.standard_normal((b, h)), np.float32)
    w = jnp.asarray(r.standard_normal((h, c)), np.float32)
    bias = jnp.asarray(r.standard_normal(c), np.float32)
    pw = jnp.asarray(r.uniform(0.5, 2, c), np.float32)
    idx = jnp.asarray(r.integers(-1, c, (b, k)), np.int32)
    soft = jnp.asarray(r.uniform(size=(b, c)), np.float32)
    mesh = Mesh(np.array(jax.devices()), ("classes",))
    classes = P(None, "classes")

    def single(x, w, bias, pw, soft, axis, labels):
        kw = dict(positive_indices=idx) if labels == "idx" else dict(labels=soft)
        out = jaxbce.linear_binary_cross_entropy(
            x, w, bias=bias, pos_weight=pw, chunk_size=128, axis=axis, **kw)
        return jnp.sum(out * jnp.arange(1.0, b + 1.0)) if axis == -1 else out

    def sharded(x, w, bias, pw, soft, axis, labels):
        def local(x, w, bias, pw, soft, idx):
            kw = dict(positive_indices=idx) if labels == "idx" else dict(labels=soft)
            return jaxbce.linear_binary_cross_entropy(
                x, w, bias=bias, pos_weight=pw, chunk_size=128, axis=axis,
                axis_name="classes", **kw)
        out = jax.shard_map(
            local, mesh=mesh, out_specs=P(),
            in_specs=(P(), classes, P("classes"), P("classes"), classes, P()),
        )(x, w, bias, pw, soft, idx)
        return jnp.sum(out * jnp.arange(1.0, b + 1.0)) if axis == -1 else out

    args = (x, w, bias, pw, soft)
    for axis, labels in ((None, "idx"), (-1, "idx"), (None, "soft")):
        argnums = (0, 1, 2, 3) + ((4,) if labels == "soft" else ())
        f1 = jax.jit(jax.value_and_grad(partial(single, axis=axis, labels=labels), argnums))
        fn = jax.jit(jax.value_and_grad(partial(sharded, axis=axis, labels=labels), argnums))
        (v1, g1), (vn, gn) = f1(*args), fn(*args)
        np.testing.assert_allclose(vn, v1, rtol=2e-6)
        for a, e in zip(gn, g1):
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * float(jnp.abs(e).max()))
        compiled = fn.lower(*args).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp < w.nbytes / 8, (temp, w.nbytes)  # less than one device's share
        assert "all-gather" not in compiled.as_text()
        print(axis, labels, "temp", temp, "w", w.nbytes)
    print("OK")
    """
)


def test_class_parallel_on_8_devices_equals_one_device():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    out = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
