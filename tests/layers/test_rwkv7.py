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
from tessera.layers.mixers.rwkv7 import lora_ranks
from tessera.models.create import ModelSpec
from tessera.models.registry import build_model
from tessera.train.flops import forward_flops_per_token
from tessera.train.trainer import train
from tests.cached_decode import build_lm, check_cached_decode, params_by_leaf, random_tokens

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
        y, z, caches = run(mixer, cmix, x[:, piece], ones[:, piece], pos, caches, v_first[:, piece])
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


# -- the LM ----------------------------------------------------------------------------------------

RWKV7_LM = "rwkv7:tiny,model.dtype=float32,model.rwkv7.chunk_size=3"


def lm_leaf_value(rng, name, shape):
    """Every parameter moved off its init (zero projections, constant lerps)."""
    if len(shape) >= 2 and name not in ("r_k",):  # (stacked) matrices: 1 / sqrt(fan_in)
        return rng.normal(size=shape) / np.sqrt(shape[-2])
    return 0.5 + 0.3 * rng.normal(size=shape)


def random_params(spec, seed=0):
    return params_by_leaf(spec, lm_leaf_value, seed)


@functools.cache
def build(spec_text=RWKV7_LM, seed=0):
    """(cfg, params, apply, model), shared between tests (so are apply's compilations)."""
    return build_lm(spec_text, random_params, seed)


def test_lm_cached_decode_matches_full_forward():
    """Prefill 4 tokens, a chunk of 4 (chunks of 3: both cross a chunk boundary), then one token
    at a time: the logits of one uncached pass. The cache is constant-size and float32 WKV."""
    cfg, params, apply, model = build()
    tokens = random_tokens((2, 12), cfg.vocab_size, seed=10)
    full = apply(params, tokens).logits
    cache = model.init_cache(2, 12)
    check_cached_decode(apply, params, tokens, full, cache, (4, 4), TOL)
    assert model.cache_length(4096) == 1
    mixer_cache, channel_cache = cache["layers"][0]
    assert mixer_cache["wkv"].shape == (3, 2, 4, 32, 32) and mixer_cache["wkv"].dtype == jnp.float32
    assert mixer_cache["shift"].shape == channel_cache["shift"].shape == (3, 2, 128)
    assert model.cache_axes()["prefix"][0][0]["wkv"] == (
        "cache_batch",
        "cache_rwkv_heads",
        "head_dim",
        None,
    )


def test_lm_packed_rows_and_padded_prefill():
    """Two documents and padding in one row give each document's own logits; a right-padded
    prefill (prompts of 5 and 3) then decode continues each row from its own length."""
    cfg, params, apply, model = build()
    docs = random_tokens((2, 7), cfg.vocab_size, seed=5)
    alone = apply(params, docs).logits
    tokens = jnp.concatenate([docs[:1, :5], docs[1:], jnp.full((1, 2), 3, jnp.int32)], axis=1)
    segment_ids = jnp.array([[1] * 5 + [2] * 7 + [0] * 2], jnp.int32)
    packed = apply(params, tokens, segment_ids=segment_ids).logits
    np.testing.assert_allclose(packed[0, :5], alone[0, :5], **TOL)
    np.testing.assert_allclose(packed[0, 5:12], alone[1], **TOL)

    lens = [5, 3]
    prompt = docs[:, :5].at[1, 3:].set(7)
    pad = jnp.array([[1] * 5, [1] * 3 + [0] * 2], jnp.int32)
    out = apply(params, prompt, segment_ids=pad, cache=model.init_cache(2, 10))
    for i, n in enumerate(lens):
        np.testing.assert_allclose(out.logits[i, :n], alone[i, :n], **TOL)
    nxt = jnp.stack([docs[0, 5], docs[1, 3]])[:, None]
    out = apply(params, nxt, cache=out.cache)
    for i, n in enumerate(lens):
        np.testing.assert_allclose(out.logits[i, 0], alone[i, n], **TOL, err_msg=f"row {i}")


def test_first_layer_must_be_a_prefix_block():
    cfg = load_config("rwkv7:tiny,model.prefix=(),model.dtype=float32").model
    model = build_model(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="put the first layer in model.prefix"):
        model(jnp.zeros((1, 4), jnp.int32))


@pytest.mark.slow
def test_tiny_config_trains(tmp_path):
    """20 steps on the embedded corpus (short rows, one device: the time is the compile)."""
    config = load_config(
        "rwkv7:tiny,train.steps=20,train.progress=False,train.tensorboard=False,"
        "data.seq_len=32,data.global_batch_size=8,optim.warmup_steps=0,"
        "checkpoint.async_save=False,eval.every=0"
    )
    result = train(config, str(tmp_path), devices=jax.devices()[:1])
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 1.0, losses


def test_presets():
    """Published shapes: parameter counts of RWKV-7 0.1B (191M with its 65536 vocabulary),
    1.5B (1.53B) and 7.2B, and their LoRA ranks."""
    for name, params, layers, ranks in (
        ("0.1b", 191.1e6, 12, (64, 64, 32, 128)),
        ("1.5b", 1.528e9, 24, (96, 96, 64, 256)),
        ("7b", 7.2e9, 32, (128, 128, 96, 480)),
    ):
        cfg = load_config(f"rwkv7:{name}").model
        assert cfg.num_layers == layers and cfg.vocab_size == 65536 and cfg.head_dim == 64
        assert cfg.prefix == ("rwkv7:rwkv7_cmix",) and cfg.embed_norm and cfg.norm == "layernorm"
        assert tuple(lora_ranks(cfg).values()) == ranks
        assert ModelSpec(cfg).num_params() == pytest.approx(params, rel=0.01), name


def test_flops_match_cost_analysis():
    """XLA's count for the lowered (unoptimised) forward, which also counts the elementwise work
    (decay exponentials, token shift, norms) that the counter leaves out: within 3%."""
    cfg = load_config(
        "rwkv7:tiny,model.dtype=float32,model.scan_layers=False,model.num_layers=2,"
        "model.d_model=256,model.head_dim=64,model.mlp_dim=1024"
    ).model
    model = build_model(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    b, t = 2, 128

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens).logits

    cost = jax.jit(forward).lower(state, jnp.zeros((b, t), jnp.int32)).cost_analysis()
    assert cost["flops"] == pytest.approx(forward_flops_per_token(cfg, t) * b * t, rel=0.03)
