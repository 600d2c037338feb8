"""RWKV-7 time mix and channel mix: fla's layers (golden file), chunked vs sequential through the
mixer, packing, padding, cached decode through the LM, training, FLOPs and presets."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tessera.configs import load_config
from tessera.layers.mixers import RWKV7, RWKV7ChannelMix, SeqInfo

TOL = dict(rtol=2e-5, atol=2e-5)
GOLDEN = pathlib.Path(__file__).parents[1] / "fixtures" / "fla" / "rwkv7_layers.npz"
# One jitted call for any module (mixer or channel mix) and arguments.
call = jax.jit(lambda module, *args: module(*args))


def small_cfg(**rwkv7):
    """D = 16, 2 heads of 8, LoRA ranks 4 / 2, FFN 32, float32: the golden file's shapes."""
    cfg = load_config("llama:tiny,model.dtype=float32").model
    cfg.update(d_model=16, head_dim=8, mlp_dim=32, norm_eps=1e-5)
    cfg.rwkv7.update(
        decay_low_rank_dim=4, a_low_rank_dim=4, v_low_rank_dim=2, gate_low_rank_dim=4, **rwkv7
    )
    return cfg


def with_params(module, params):
    """``module`` with its parameters replaced by the float32 numpy arrays ``params``."""
    graphdef, state = nnx.split(module)
    pure = nnx.to_pure_dict(state)
    assert set(pure) == set(params), set(pure) ^ set(params)
    for k, v in params.items():
        assert pure[k].shape == v.shape, (k, pure[k].shape, v.shape)
    nnx.replace_by_pure_dict(state, {k: jnp.asarray(v, jnp.float32) for k, v in params.items()})
    return nnx.merge(graphdef, state)


def random_mixer(cfg, seed=0, scale=0.3):
    """An RWKV7 mixer with every parameter moved off its init (o_proj starts at zero)."""
    mixer = RWKV7(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    pure = nnx.to_pure_dict(nnx.split(mixer)[1])
    return with_params(mixer, {k: v + scale * rng.normal(size=v.shape) for k, v in pure.items()})


def seq_info(segment_ids, positions=None):
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    return SeqInfo(jnp.asarray(positions, jnp.int32), segment_ids)


# -- fla's layers ---------------------------------------------------------------------------------


def fla_to_ours(g, prefix):
    """The module docstring's mapping, ours <- fla, for one golden file's parameters."""
    p = {k[len(prefix) + 1 :]: v for k, v in g.items() if k.startswith(prefix + ".")}
    if prefix == "ffn":
        return {"x_k": p["x_k"], "key": p["key.weight"].T, "value": p["value.weight"].T}
    ours = {f"x_{c}": p[f"x_{c}"].reshape(-1) for c in "rwkvag"}
    ours |= {n: p[n] for n in ("k_k", "k_a", "r_k")}
    ours |= {f"{n}_proj": p[f"{n}_proj.weight"].T for n in "rkvo"}
    for n in "wavg":
        ours[f"{n}_lora_down"] = p[f"{n}_lora.lora.0.weight"].T
        ours[f"{n}_lora_up"] = p[f"{n}_lora.lora.2.weight"].T
        if n != "g":
            ours[f"{n}_lora_bias"] = p[f"{n}_lora.lora.2.bias"]
    ours["g_norm_weight"], ours["g_norm_bias"] = p["g_norm.weight"], p["g_norm.bias"]
    return ours


@pytest.mark.parametrize("impl", ["chunked", "sequential"])
def test_matches_fla_layers(impl):
    """tools/make_fla_rwkv7_golden.py: fla's first layer (stores v_first), a later layer (value
    residual against a given v_first) and the channel mix, all parameters random."""
    g = dict(np.load(GOLDEN))
    cfg = small_cfg(impl=impl, chunk_size=3)
    mixer = with_params(RWKV7(cfg, rngs=nnx.Rngs(0)), fla_to_ours(g, "attn"))
    x = jnp.asarray(g["x"])
    info = seq_info(np.ones(x.shape[:2]))
    out0, cache, aux, streams = call(mixer, x, info)
    assert cache is None and aux == {} and set(streams) == {"v_first"}
    np.testing.assert_allclose(out0, g["attn0_out"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(streams["v_first"], g["attn0_v_first"], rtol=1e-5, atol=1e-5)
    out1, _, _, streams1 = call(mixer, x, info, None, {"v_first": jnp.asarray(g["v_first"])})
    np.testing.assert_allclose(out1, g["attn1_out"], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(streams1["v_first"], g["v_first"])  # passed on unchanged
    cmix = with_params(RWKV7ChannelMix(cfg, rngs=nnx.Rngs(0)), fla_to_ours(g, "ffn"))
    y, aux, cache = call(cmix, x, info)
    assert cache is None and aux == {}
    np.testing.assert_allclose(y, g["ffn_out"], rtol=1e-5, atol=1e-5)


# -- the mixer alone ------------------------------------------------------------------------------


@functools.cache
def mixers():
    """(chunked mixer with chunks of 3, the same parameters run sequentially)."""
    cfg = small_cfg(chunk_size=3)
    chunked = random_mixer(cfg)
    graphdef, state = nnx.split(chunked)
    sequential = nnx.merge(graphdef, state)
    sequential.impl = "sequential"
    return cfg, chunked, sequential


def test_chunked_matches_sequential_with_gradients():
    """Packed rows with padding, with and without v_first: same outputs and gradients wrt the
    parameters and the inputs (x and v_first)."""
    cfg, chunked, sequential = mixers()
    x = jax.random.normal(jax.random.key(0), (2, 11, 16))
    v_first = jax.random.normal(jax.random.key(1), (2, 11, 16))
    info = seq_info([[1] * 4 + [2] * 7, [1] * 8 + [0] * 3])

    def value_and_grads(mixer, with_v):
        graphdef, state = nnx.split(mixer)

        def loss(state, x, v_first):
            streams = {"v_first": v_first} if with_v else {}
            y, _, _, _ = nnx.merge(graphdef, state)(x, info, None, streams)
            return jnp.sum(y * jnp.cos(jnp.arange(16.0))), y

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
        return fn(state, x, v_first)

    for with_v in (False, True):
        (_, want_y), want_g = value_and_grads(sequential, with_v)
        (_, got_y), got_g = value_and_grads(chunked, with_v)
        np.testing.assert_allclose(got_y, want_y, **TOL)
        for got, want in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
            assert np.isfinite(np.asarray(got)).all()
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        grad_v = np.asarray(got_g[2])
        assert (np.abs(grad_v).max() > 0) == with_v  # v_first is read only when given


def run_cached(mixer, cmix, x, segment_ids, positions, caches, v_first):
    """Both mixers on one cached call: (mixer out, channel out, new caches)."""
    info = seq_info(segment_ids, positions)
    y, c1, _, _ = mixer(x, info, caches[0], {"v_first": v_first})
    z, _, c2 = cmix(x, info, caches[1])
    return y, z, (c1, c2)


def test_cached_pieces_match_one_pass():
    """Mixer and channel mix with a cache: a prefill of 4, a piece of 5 (crossing chunks of 3),
    then single tokens (the sequential step) equal one uncached pass."""
    cfg, mixer, _ = mixers()
    cmix = RWKV7ChannelMix(cfg, rngs=nnx.Rngs(3))
    cmix = with_params(
        cmix, {k: np.asarray(v) + 0.3 for k, v in nnx.to_pure_dict(nnx.split(cmix)[1]).items()}
    )
    t = 12
    x = jax.random.normal(jax.random.key(2), (2, t, 16))
    v_first = jax.random.normal(jax.random.key(3), (2, t, 16))
    ones = np.ones((2, t), np.int32)
    want_y, _, _, _ = call(mixer, x, seq_info(ones), None, {"v_first": v_first})
    want_z, _, _ = call(cmix, x, seq_info(ones))
    caches = (
        RWKV7.init_cache(cfg, 2, t, jnp.float32),
        RWKV7ChannelMix.init_cache(cfg, 2, t, jnp.float32),
    )
    start = 0
    run = jax.jit(run_cached)
    for size in (4, 5, 1, 1, 1):
        piece = slice(start, start + size)
        pos = np.broadcast_to(np.arange(start, start + size), (2, size))
        y, z, caches = run(
            mixer, cmix, x[:, piece], ones[:, piece], pos, caches, v_first[:, piece]
        )
        np.testing.assert_allclose(y, want_y[:, piece], **TOL, err_msg=f"{start}")
        np.testing.assert_allclose(z, want_z[:, piece], **TOL, err_msg=f"{start}")
        start += size
    assert caches[0]["wkv"].shape == (2, 2, 8, 8) and caches[0]["wkv"].dtype == jnp.float32
    np.testing.assert_array_equal(caches[0]["shift"], x[:, start - 1])


def test_packed_documents_equal_separate_runs():
    """Two documents in one row (positions restarting or only segment ids changing) and
    padding: each document's outputs equal its own run; as one document they do not."""
    cfg, mixer, _ = mixers()
    cmix = RWKV7ChannelMix(cfg, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(4), (1, 14, 16))
    v_first = jax.random.normal(jax.random.key(5), (1, 14, 16))
    a_len, b_len = 5, 7
    seg = [[1] * a_len + [2] * b_len + [0] * 2]
    restart = [list(range(a_len)) + list(range(b_len)) + [0, 1]]
    docs = [slice(0, a_len), slice(a_len, a_len + b_len)]
    alone = []
    for d in docs:
        n = d.stop - d.start
        info = seq_info(np.ones((1, n)))
        y, _, _, _ = call(mixer, x[:, d], info, None, {"v_first": v_first[:, d]})
        z, _, _ = call(cmix, x[:, d], info)
        alone.append((y, z))
    for positions in (restart, None):
        info = seq_info(seg, positions)
        y, _, _, _ = call(mixer, x, info, None, {"v_first": v_first})
        z, _, _ = call(cmix, x, info)
        for d, (want_y, want_z) in zip(docs, alone):
            np.testing.assert_allclose(y[:, d], want_y, **TOL)
            np.testing.assert_allclose(z[:, d], want_z, **TOL)
    y, _, _, _ = call(mixer, x, seq_info(np.ones((1, 14))), None, {"v_first": v_first})
    assert not np.allclose(y[:, docs[1]], alone[1][0], atol=1e-3)


def test_padding_does_not_move_the_state():
    """Right padding with arbitrary inputs under it leaves both caches as after the last real
    token, in both mixers."""
    cfg, mixer, _ = mixers()
    cmix = RWKV7ChannelMix(cfg, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(6), (2, 8, 16))
    v_first = jax.random.normal(jax.random.key(7), (2, 8, 16))
    caches = (
        RWKV7.init_cache(cfg, 2, 8, jnp.float32),
        RWKV7ChannelMix.init_cache(cfg, 2, 8, jnp.float32),
    )
    pos = np.broadcast_to(np.arange(8), (2, 8))
    padded = [[1] * 8, [1] * 5 + [0] * 3]
    run = jax.jit(run_cached)
    _, _, got = run(mixer, cmix, x, padded, pos, caches, v_first)
    _, _, want = run_cached(
        mixer, cmix, x[:, :5], np.ones((2, 5)), pos[:, :5], caches, v_first[:, :5]
    )
    for g, w, name in zip(jax.tree.leaves(got), jax.tree.leaves(want), ("shift", "wkv", "shift")):
        np.testing.assert_allclose(g[1], w[1], **TOL, err_msg=name)
        assert not np.allclose(g[0], w[0]), name
