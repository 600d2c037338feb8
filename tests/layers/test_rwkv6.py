"""RWKV-6 time mix and channel mix: fla's semantics (a float64 numpy transcription with fla's
tensor layouts, through the documented renaming), chunked / sequential / parallel WKV through the
mixer, cached decode and prefill in pieces through the LM, packed documents, padding, cache
shapes, training, FLOPs and presets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tessera.configs import load_config
from tessera.configs.rwkv6 import ffn_width
from tessera.layers.mixers import RWKV6, RWKV6ChannelMix, SeqInfo
from tessera.models.create import ModelSpec
from tessera.models.registry import build_model
from tessera.sharding import make_mesh, make_rules, use_mesh
from tessera.train.flops import forward_flops_per_token
from tessera.train.trainer import train
from tests.cached_decode import build_lm, check_cached_decode, params_by_leaf, random_tokens

TOL = dict(rtol=2e-5, atol=2e-5)
# float32, 2 layers of width 64 (4 heads of 16), chunks of 3 tokens so prefills of 4 cross a
# chunk boundary.
RWKV = (
    "rwkv6:tiny,model.dtype=float32,model.num_layers=2,model.d_model=64,model.mlp_dim=224,"
    "model.rwkv6.head_dim=16,model.rwkv6.chunk_size=3"
)
VECTORS = ("x_mu", "key_mu", "receptance_mu", "x_bias")


def leaf_value(rng, name, shape):
    """A realistic random value for a parameter called ``name`` (stacked over layers or not)."""
    if name in VECTORS:  # token-shift mix weights in [0, 1]
        return rng.uniform(0.0, 1.0, shape)
    if name == "w_bias":  # per-step log decays -exp(w) from about -0.05 to -1.6
        return rng.uniform(-3.0, 0.5, shape)
    if name in ("g_norm_weight", "scale"):
        return 1.0 + 0.1 * rng.normal(size=shape)
    if name in ("g_norm_bias", "bias", "bonus"):
        return 0.3 * rng.normal(size=shape)
    if name == "embedding":
        return 0.3 * rng.normal(size=shape)
    return rng.normal(size=shape) / np.sqrt(shape[-2])  # matrices: 1 / sqrt(fan_in)


def random_params(spec, seed=0):
    return params_by_leaf(spec, leaf_value, seed)


@functools.cache
def build(spec_text, seed=0):
    """(cfg, params, apply, model), shared between tests (so are apply's compilations)."""
    return build_lm(spec_text, random_params, seed)


def random_mixer(cls, cfg, seed=1):
    """(module with random parameters, those parameters as numpy float64 by name)."""
    graphdef, state = nnx.split(cls(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    ours = {k: leaf_value(rng, k, v.shape) for k, v in nnx.to_pure_dict(state).items()}
    nnx.replace_by_pure_dict(state, {k: jnp.asarray(v, jnp.float32) for k, v in ours.items()})
    return nnx.merge(graphdef, state), ours


def info_for(segment_ids, positions=None):
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    return SeqInfo(jnp.asarray(positions, jnp.int32), segment_ids)


# -- fla's semantics -------------------------------------------------------------------------------


def silu(a):
    return a / (1.0 + np.exp(-a))


def fla_shift_delta(x):
    """fla's token_shift without cu_seqlens: x[t-1] - x[t], x[-1] = 0."""
    return np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], axis=1) - x


def fla_time_mix_numpy(p, x, heads, eps):
    """float64 numpy transcription of fla's RWKV6Attention.forward (no cache), torch layouts."""
    b, t, d = x.shape
    rank = p["x_proj.0.linear.weight"].shape[0] // 5
    delta = fla_shift_delta(x)
    mix = np.tanh((x + delta * p["x_proj.0.mu"]) @ p["x_proj.0.linear.weight"].T)
    mix = np.einsum("btnr,hnr->btnh", mix.reshape(b, t, 5, rank),
                    p["x_proj.2.weight"].reshape(d, 5, rank)) + p["x_bias"]
    mr, mw, mk, mv, mg = (mix[:, :, i] for i in range(5))
    r = (x + delta * mr) @ p["r_proj.linear.weight"].T
    lora = np.tanh((x + delta * mw) @ p["w_proj.linear.lora.0.weight"].T)
    w = lora @ p["w_proj.linear.lora.2.weight"].T + p["w_proj.linear.lora.2.bias"]
    k = (x + delta * mk) @ p["k_proj.linear.weight"].T
    v = (x + delta * mv) @ p["v_proj.linear.weight"].T
    g = (x + delta * mg) @ p["g_proj.linear.weight"].T
    split = lambda a: a.reshape(b, t, heads, -1)
    r, w, k, v = split(r), split(-np.exp(w)), split(k), split(v)
    u = p["bonus"]
    state = np.zeros((b, heads, r.shape[-1], v.shape[-1]))
    o = np.zeros_like(v)
    for i in range(t):  # fla's ops/rwkv6/recurrent_naive.py, scale 1
        kv = k[:, i, :, :, None] * v[:, i, :, None, :]
        o[:, i] = np.einsum("bhk,bhkv->bhv", r[:, i], state + u[None, :, :, None] * kv)
        state = state * np.exp(w[:, i])[..., None] + kv
    o = (o - o.mean(-1, keepdims=True)) / np.sqrt(o.var(-1, keepdims=True) + eps)
    o = o.reshape(b, t, -1) * p["g_norm.weight"] + p["g_norm.bias"]
    return (o * silu(g)) @ p["o_proj.weight"].T


def fla_channel_mix_numpy(p, x):
    """float64 numpy transcription of fla's RWKV6FeedForward.forward (no cache)."""
    delta = fla_shift_delta(x)
    key = np.maximum((x + delta * p["key.mu"]) @ p["key.linear.weight"].T, 0.0) ** 2
    receptance = (x + delta * p["receptance.mu"]) @ p["receptance.linear.weight"].T
    return (1.0 / (1.0 + np.exp(-receptance))) * (key @ p["value.weight"].T)


def test_time_and_channel_mix_match_fla_semantics():
    """Our parameters mapped to fla's tensors as the module docstring says give fla's outputs
    (key width 0.5 d_model as fla's default, 3 heads, 11 tokens over chunks of 4)."""
    cfg = load_config(RWKV).model
    cfg.update(d_model=24, mlp_dim=40)
    cfg.rwkv6.update(head_dim=8, expand_k=0.5, proj_low_rank_dim=4, gate_low_rank_dim=6,
                     chunk_size=4, group_norm_eps=1e-5)
    mixer, ours = random_mixer(RWKV6, cfg)
    d, r = 24, 4
    fla = {
        "x_proj.0.mu": ours["x_mu"],
        "x_proj.0.linear.weight": ours["x_proj_a"].T,
        "x_proj.2.weight": ours["x_proj_b"].transpose(2, 0, 1).reshape(d, 5 * r),
        "x_bias": ours["x_bias"],
        "w_proj.linear.lora.0.weight": ours["w_lora_a"].T,
        "w_proj.linear.lora.2.weight": ours["w_lora_b"].T,
        "w_proj.linear.lora.2.bias": ours["w_bias"],
        "bonus": ours["bonus"],
        "g_norm.weight": ours["g_norm_weight"],
        "g_norm.bias": ours["g_norm_bias"],
        "o_proj.weight": ours["o_proj"].T,
    } | {f"{n}_proj.linear.weight": ours[f"{n}_proj"].T for n in "rkvg"}
    assert ours["bonus"].shape == (3, 4) and ours["v_proj"].shape == (24, 24)
    x = np.random.default_rng(2).normal(size=(2, 11, d))
    info = info_for(np.ones((2, 11)))
    got, cache, aux = jax.jit(lambda m, x: m(x, info))(mixer, jnp.asarray(x, jnp.float32))
    assert cache is None and aux == {}
    np.testing.assert_allclose(got, fla_time_mix_numpy(fla, x, 3, 1e-5), rtol=1e-4, atol=1e-4)

    channel, ours = random_mixer(RWKV6ChannelMix, cfg)
    fla = {
        "key.mu": ours["key_mu"],
        "key.linear.weight": ours["key"].T,
        "value.weight": ours["value"].T,
        "receptance.mu": ours["receptance_mu"],
        "receptance.linear.weight": ours["receptance"].T,
    }
    got, aux, cache = jax.jit(lambda m, x: m(x, info))(channel, jnp.asarray(x, jnp.float32))
    assert cache is None and aux == {}
    np.testing.assert_allclose(got, fla_channel_mix_numpy(fla, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "rwkv6, message",
    [
        (dict(head_dim=48), r"value_dim = expand_v \* d_model = 64 is not a multiple of "),
        (dict(expand_k=0.7), r"key_dim = expand_k \* d_model = 45 is not a multiple of the 4 "),
    ],
)
def test_config_errors(rwkv6, message):
    cfg = load_config(RWKV).model
    cfg.rwkv6.update(**rwkv6)
    with pytest.raises(ValueError, match=message):
        build_model(cfg, rngs=nnx.Rngs(0))


# -- the WKV forms through the mixer ------------------------------------------------------------


def test_wkv_impls_agree_through_the_mixer():
    """chunked (chunks of 3), sequential and parallel WKV: same outputs, final cache and
    parameter gradients on packed rows with padding."""
    cfg = load_config(RWKV).model
    x = jax.random.normal(jax.random.key(0), (2, 10, cfg.d_model))
    info = info_for([[1] * 4 + [2] * 6, [1] * 7 + [0] * 3])
    results = {}
    for impl in ("chunked", "sequential", "parallel"):
        cfg.rwkv6.impl = impl
        mixer, _ = random_mixer(RWKV6, cfg)
        graphdef, state = nnx.split(mixer)
        cache = RWKV6.init_cache(cfg, 2, 10, jnp.float32)

        def loss(state, graphdef=graphdef, cache=cache):
            y, new, _ = nnx.merge(graphdef, state)(x, info, cache)
            return jnp.sum(jnp.sin(y)), (y, new)

        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
        results[impl] = (out, grads)
    want = results["sequential"]
    for impl in ("chunked", "parallel"):
        for got, ref in zip(jax.tree.leaves(results[impl]), jax.tree.leaves(want)):
            assert np.isfinite(np.asarray(got)).all(), impl
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=impl)


def test_padding_does_not_move_state():
    """Right padding (arbitrary inputs under it) leaves both mixers' caches as after the last
    real token; a row with no real token keeps its cache."""
    cfg = load_config(RWKV).model
    x = jax.random.normal(jax.random.key(3), (3, 8, cfg.d_model))
    padded = [[1] * 8, [1] * 5 + [0] * 3, [0] * 8]
    for cls in (RWKV6, RWKV6ChannelMix):
        mixer, _ = random_mixer(cls, cfg)
        start = jax.tree.map(lambda a: a + 0.5, cls.init_cache(cfg, 3, 8, jnp.float32))
        positions = jnp.broadcast_to(3 + jnp.arange(8), (3, 8))  # continuing a sequence

        @jax.jit
        def call(x, seg, positions=positions, mixer=mixer, start=start, cls=cls):
            out = mixer(x, info_for(seg, positions[:, : x.shape[1]]), start)
            return out[1] if cls is RWKV6 else out[2]

        got = call(x, jnp.asarray(padded))
        want = call(x[:, :5], jnp.asarray(padded)[:, :5])
        for name in got:
            np.testing.assert_allclose(got[name][1], want[name][1], **TOL, err_msg=name)
            np.testing.assert_allclose(got[name][2], start[name][2], **TOL, err_msg=name)
            assert not np.allclose(got[name][0], want[name][0]), name


# -- through the LM ------------------------------------------------------------------------------


def test_cached_decode_matches_full_forward():
    """Prefill 4 tokens, a piece of 4 more (chunks of 3: both cross a chunk boundary), then one
    token at a time: the logits of one uncached pass."""
    cfg, params, apply, model = build(RWKV)
    tokens = random_tokens((2, 12), cfg.vocab_size, seed=10)
    full = apply(params, tokens).logits
    check_cached_decode(apply, params, tokens, full, model.init_cache(2, 12), (4, 4), TOL)


def test_prefill_in_pieces_equals_one_pass():
    """The cache after a prefill in pieces (5 + 7 tokens) equals the cache after one pass of 12
    tokens; a right-padded prompt leaves the cache of its real tokens."""
    cfg, params, apply, model = build(RWKV)
    tokens = random_tokens((2, 12), cfg.vocab_size, seed=11)
    one = apply(params, tokens, cache=model.init_cache(2, 12)).cache
    first = apply(params, tokens[:, :5], cache=model.init_cache(2, 12)).cache
    pieces = apply(params, tokens[:, 5:], cache=first).cache
    for got, want in zip(jax.tree.leaves(pieces), jax.tree.leaves(one)):
        np.testing.assert_allclose(got, want, **TOL)
    padded = jnp.where(jnp.arange(14) < 12, jnp.pad(tokens, ((0, 0), (0, 2))), 7)
    segment_ids = jnp.broadcast_to(jnp.arange(14) < 12, (2, 14)).astype(jnp.int32)
    got = apply(params, padded, segment_ids=segment_ids, cache=model.init_cache(2, 14)).cache
    for a, b in zip(jax.tree.leaves(got["layers"]), jax.tree.leaves(one["layers"])):
        np.testing.assert_allclose(a, b, **TOL)


def test_packed_row_matches_separate_documents():
    """Two documents and padding in one row give each document's own logits, whether positions
    restart per document or only the segment ids change; as one segment they do not."""
    cfg, params, apply, _ = build(RWKV)
    docs = random_tokens((2, 7), cfg.vocab_size, seed=5)
    alone = apply(params, docs).logits
    tokens = jnp.concatenate([docs[:1, :5], docs[1:], jnp.full((1, 2), 3, jnp.int32)], axis=1)
    segment_ids = jnp.array([[1] * 5 + [2] * 7 + [0] * 2], jnp.int32)
    restart = jnp.array([list(range(5)) + list(range(7)) + [0, 1]], jnp.int32)
    running = jnp.arange(14, dtype=jnp.int32)[None]
    for positions in (restart, running):
        packed = apply(params, tokens, positions=positions, segment_ids=segment_ids).logits
        np.testing.assert_allclose(packed[0, :5], alone[0, :5], **TOL)
        np.testing.assert_allclose(packed[0, 5:12], alone[1], **TOL)
    one = apply(params, tokens, positions=running, segment_ids=jnp.ones_like(segment_ids)).logits
    assert not np.allclose(one[0, 5:12], alone[1], atol=1e-3)


def test_cache_shapes_do_not_depend_on_length():
    _, _, _, model = build(RWKV)
    short, long = model.init_cache(2, 16), model.init_cache(2, 4096)
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), short["layers"])
    assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), long["layers"])
    ((time_mix, channel_mix),) = short["layers"]
    assert time_mix["shift"].shape == (2, 2, 64) and time_mix["shift"].dtype == jnp.float32
    assert time_mix["wkv"].shape == (2, 2, 4, 16, 16) and time_mix["wkv"].dtype == jnp.float32
    assert channel_mix["shift"].shape == (2, 2, 64)
    bf16 = model.init_cache(2, 16, jnp.bfloat16)["layers"][0]
    assert bf16[0]["shift"].dtype == jnp.bfloat16 and bf16[0]["wkv"].dtype == jnp.float32
    axes = model.cache_axes()["layers"][0]
    assert axes[0]["wkv"] == ("layers", "cache_batch", "cache_rwkv_heads", "head_dim", "head_dim")
    assert axes[1]["shift"] == ("layers", "cache_batch", "rwkv_shift")


def test_sharded_forward_matches_unsharded():
    """(fsdp=4, tensor=2): heads split over tensor; packed and padded rows."""
    config = load_config(RWKV + ",mesh.data=1,mesh.fsdp=4,mesh.tensor=2")
    mesh, rules = make_mesh(config.mesh), make_rules(config.mesh.rules)
    spec = ModelSpec(config.model)
    params = spec.init(0, mesh, rules)
    block = params["units"]["blocks"][0]
    expect = [
        (block["mixer"]["r_proj"], P(None, "fsdp", "tensor")),
        (block["mixer"]["o_proj"], P(None, "tensor", "fsdp")),
        (block["mixer"]["bonus"], P(None, "tensor", None)),
        (block["channel"]["key"], P(None, "fsdp", "tensor")),
    ]
    for array, pspec in expect:
        assert array.sharding.is_equivalent_to(NamedSharding(mesh, pspec), array.ndim), (
            array.sharding,
            pspec,
        )
    tokens = random_tokens((4, 16), config.model.vocab_size, seed=14)
    segment_ids = jnp.array([[1] * 16, [1] * 6 + [2] * 10, [1] * 12 + [0] * 4, [1] * 16])

    def forward(p):
        return spec.merge(p)(tokens, segment_ids=segment_ids).logits

    want = jax.jit(forward)(jax.device_get(params))
    with use_mesh(mesh, rules):
        got = jax.jit(forward)(params)
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.slow
def test_tiny_config_trains(tmp_path):
    """20 steps on the embedded corpus (short rows, one device): loss finite and falling."""
    config = load_config(
        "rwkv6:tiny,train.steps=20,train.progress=False,train.tensorboard=False,"
        "model.dtype=float32,data.seq_len=32,data.global_batch_size=8,optim.warmup_steps=0,"
        "checkpoint.async_save=False,eval.every=0"
    )
    result = train(config, str(tmp_path), devices=jax.devices()[:1])
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 1.0, losses


def test_flops_match_cost_analysis():
    """XLA's count for the lowered forward; it also counts the elementwise work (decay tensors,
    token shift, norms) that the matmul-only counter leaves out: within 10%."""
    cfg = load_config(RWKV + ",model.scan_layers=False,model.num_layers=2,model.d_model=256,"
                      "model.mlp_dim=896,model.rwkv6.head_dim=64,model.rwkv6.chunk_size=16").model
    model = build_model(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    b, t = 2, 128

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens).logits

    cost = jax.jit(forward).lower(state, jnp.zeros((b, t), jnp.int32)).cost_analysis()
    assert cost["flops"] == pytest.approx(forward_flops_per_token(cfg, t) * b * t, rel=0.10)


def test_presets():
    assert [ffn_width(d) for d in (768, 2048, 4096, 100)] == [2688, 7168, 14336, 352]
    # 1.60e9 and 7.64e9 are Finch 1.6B's and 7B's sizes; 0.1b counts 101M of embedding and head.
    for name, params, layers, d in (("0.1b", 197e6, 12, 768), ("1.6b", 1.60e9, 24, 2048),
                                    ("7b", 7.64e9, 32, 4096)):
        cfg = load_config(f"rwkv6:{name}").model
        assert cfg.family == "rwkv6" and cfg.num_layers == layers and cfg.d_model == d
        assert cfg.vocab_size == 65536 and cfg.rwkv6.head_dim == 64 and cfg.embed_norm
        assert cfg.norm == "layernorm" and cfg.pattern == ("rwkv6:rwkv6_cmix",)
        assert ModelSpec(cfg).num_params() == pytest.approx(params, rel=0.005), name
