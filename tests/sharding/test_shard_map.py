"""shard_map_kernel: a per-shard kernel over the active mesh equals the unsharded computation
(forward and gradients); without a mesh it just calls the function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tessera.configs import load_config
from tessera.kernels.attention import reference
from tessera.sharding import make_mesh, use_mesh
from tessera.sharding.kernels import shard_map_kernel

QKV = ("batch", "length", "act_heads", None)
ROWS = ("batch", "length")


def mesh(**sizes):
    cfg = load_config("llama:tiny").mesh
    cfg.update(data=1)
    cfg.update(**sizes)
    return make_mesh(cfg)


def inputs(b=4, t=6, hq=8, hkv=4, d=8, packed=True):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for h in (hq, hkv, hkv))
    pos = jnp.tile(jnp.arange(t, dtype=jnp.int32)[None], (b, 1))
    seg = jnp.asarray(np.repeat([[1] * (t // 2) + [2] * (t - t // 2)], b, 0), jnp.int32)
    return q, k, v, pos, seg if packed else None


def kernel(q, k, v, pos, seg):
    """The reference attention as a per-shard kernel (segment ids may be None)."""
    return reference.attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                               kv_segment_ids=seg)


def sharded_attention(**kw):
    return shard_map_kernel(kernel, in_axes=(QKV, QKV, QKV, ROWS, ROWS), out_axes=QKV, **kw)


def loss(attn_fn, q, k, v, pos, seg):
    out = attn_fn(q, k, v, pos, seg)
    return jnp.sum(out * jnp.cos(out)), out


def value_and_grads(attn_fn, args):
    fn = jax.value_and_grad(lambda q, k, v: loss(attn_fn, q, k, v, *args[3:]), (0, 1, 2),
                            has_aux=True)
    return jax.jit(fn)(*args[:3])


@pytest.mark.parametrize("packed", [True, False], ids=["segments", "no_segments"])
def test_attention_over_batch_and_heads_matches_unsharded(packed):
    args = inputs(packed=packed)
    (_, want), want_grads = value_and_grads(kernel, args)
    seen = []

    def spy(q, k, v, pos, seg):
        seen.append((q.shape, k.shape, pos.shape))
        return kernel(q, k, v, pos, seg)

    with use_mesh(mesh(data=2, tensor=4)):
        attn_fn = shard_map_kernel(spy, in_axes=(QKV, QKV, QKV, ROWS, ROWS), out_axes=QKV)
        (_, got), grads = value_and_grads(attn_fn, args)
    assert seen[0] == ((2, 6, 2, 8), (2, 6, 1, 8), (2, 6))  # batch / 2 and heads / 4 per shard
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for name, g, w in zip("qkv", grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_names_that_cannot_split_everywhere_split_nowhere():
    """4 kv heads on tensor=8: heads stay whole for q too (GQA groups stay aligned)."""
    args = inputs(hq=8, hkv=4)
    seen = []

    def spy(*a):
        seen.append(a[0].shape)
        return kernel(*a)

    with use_mesh(mesh(data=1, tensor=8)):
        got = shard_map_kernel(spy, in_axes=(QKV, QKV, QKV, ROWS, ROWS), out_axes=QKV)(*args)
    assert seen == [(4, 6, 8, 8)]
    np.testing.assert_allclose(got, kernel(*args), atol=1e-5, rtol=1e-5)


def test_unsplit_axes_give_the_kernel_the_whole_sequence():
    args = inputs(b=2, hq=4, hkv=4)
    seen = []

    def spy(*a):
        seen.append(a[0].shape)
        return kernel(*a)

    with use_mesh(mesh(data=1, sequence=2, tensor=4)):
        per_shard = shard_map_kernel(spy, in_axes=(QKV, QKV, QKV, ROWS, ROWS), out_axes=QKV,
                                     unsplit=("sequence",))
        got = jax.jit(per_shard)(*args)
        with pytest.raises(ValueError, match=r"unsplit axes \['seq'\] are not mesh axes"):
            sharded_attention(unsplit=("seq",))(*args)
    assert seen == [(2, 6, 1, 8)]  # length 6 whole, heads split over tensor
    np.testing.assert_allclose(got, kernel(*args), atol=1e-5, rtol=1e-5)


def test_tuple_outputs_and_names_no_input_carries():
    """An output name no input carries stays whole (act_mlp would be split over tensor)."""
    x = jnp.arange(8 * 4, dtype=jnp.float32).reshape(8, 4)

    def fn(x):
        return x * 2, jnp.broadcast_to(x[:, :1], (x.shape[0], 5))

    with use_mesh(mesh(data=2, tensor=4)):
        double, wide = shard_map_kernel(
            fn, in_axes=(("batch", None),), out_axes=(("batch", None), ("batch", "act_mlp"))
        )(x)
    np.testing.assert_allclose(double, x * 2)
    np.testing.assert_allclose(wide, fn(x)[1])
    assert wide.sharding.spec == P("data", None)


def test_an_input_every_shard_reads_gets_the_summed_gradient():
    x = jnp.arange(8 * 4, dtype=jnp.float32).reshape(8, 4)
    w = jnp.linspace(-1.0, 1.0, 4)

    def grad_of(fn):
        return jax.jit(jax.grad(lambda w: jnp.sum(jnp.sin(fn(x, w))), argnums=0))

    want = grad_of(lambda x, w: x * w)(w)
    with use_mesh(mesh(data=2, tensor=4)):
        got = grad_of(shard_map_kernel(lambda x, w: x * w, in_axes=(("batch", None), (None,)),
                                       out_axes=("batch", None)))(w)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_without_a_mesh_it_calls_the_function():
    args = inputs()
    calls = []

    def fn(*a):
        calls.append(a)
        return kernel(*a)

    got = shard_map_kernel(fn, in_axes=(QKV, QKV, QKV, ROWS, ROWS), out_axes=QKV)(*args)
    assert len(calls) == 1 and all(a is b for a, b in zip(calls[0], args, strict=True))
    np.testing.assert_array_equal(got, kernel(*args))


def test_argument_count_and_rank_errors():
    args = inputs()
    with pytest.raises(ValueError, match="5 arguments but 4 in_axes entries"):
        shard_map_kernel(kernel, in_axes=(QKV, QKV, QKV, ROWS), out_axes=QKV)(*args)
    with pytest.raises(ValueError, match=r"argument 3 has shape \(4, 6\) but axis names"):
        shard_map_kernel(kernel, in_axes=(QKV, QKV, QKV, QKV, ROWS), out_axes=QKV)(*args)
    x = jnp.ones((8, 4))
    conflict = pytest.raises(ValueError, match="cannot split 'act_mlp'")
    with use_mesh(mesh(data=2, tensor=4)), conflict:
        shard_map_kernel(lambda a, b: a, in_axes=(("batch", "act_heads"), ("batch", "act_mlp")),
                         out_axes=("act_heads", "act_mlp"))(x, x)
