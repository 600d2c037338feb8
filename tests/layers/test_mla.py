"""Multi-head latent attention: the training form against a plain jnp transcription of the MLA
math (forward and gradients, with and without query compression, packed rows, yarn scale),
absorbed cached decode against the uncached LM (prefill in chunks, a sliding window, mixed
prompt lengths through the decode engine), the cache layout and size, remat tags, FLOPs,
presets and config errors."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tessera.configs import load_config
from tessera.layers.mixers import MLA, SeqInfo
from tessera.layers.positions import rope_frequencies
from tessera.models.create import ModelSpec
from tessera.models.registry import build_model
from tessera.models.remat import minimal_saved_names
from tessera.serve import Decoder, DecodeStats
from tessera.serve.engine import single_device_mesh
from tessera.sharding import logical_to_spec, make_rules
from tessera.train.flops import causal_saving_per_token, forward_flops_per_token
from tessera.train.trainer import train
from tests.cached_decode import check_cached_decode, random_tokens
from tests.serve.conftest import reference_greedy

TINY = "deepseek:tiny,model.dtype=float32,model.init_std=0.1"
TOL = dict(rtol=2e-5, atol=2e-5)


# -- the training form against the MLA math ------------------------------------------------------


def rms(x, w, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate(x, positions, inv_freq, factor):
    """Half-split RoPE written out: feature i pairs with i + R at angle position * inv_freq[i]."""
    half = inv_freq.shape[0]
    angle = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, R]
    cos, sin = jnp.cos(angle) * factor, jnp.sin(angle) * factor
    if x.ndim == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rotate_pairs(x, positions, inv_freq, factor):
    """Interleaved RoPE (HF DeepSeek's complex form): features (2i, 2i + 1) at angle
    position * inv_freq[i]."""
    angle = positions[..., None].astype(jnp.float32) * inv_freq
    cos, sin = jnp.cos(angle) * factor, jnp.sin(angle) * factor
    if x.ndim == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).reshape(x.shape)


def mla_reference(p, x, positions, segment_ids, *, nope, rank, inv_freq, factor, scale, eps,
                  window=None, interleave=False):
    """DeepSeek's MLA as HF writes it, in plain jnp: query (optionally through a normed rank-Q
    bottleneck), [latent | k_rope] = x wkv_a, latent normed and decompressed per head into
    [k_nope | v], the rope key shared by all heads, masked softmax, output projection."""
    if "wq" in p:
        q = jnp.einsum("btd,dhk->bthk", x, p["wq"])
    else:
        c = rms(x @ p["wq_a"], p["q_norm"]["scale"], eps)
        q = jnp.einsum("btr,rhk->bthk", c, p["wq_b"])
    rotate_fn = rotate_pairs if interleave else rotate
    q = jnp.concatenate([q[..., :nope], rotate_fn(q[..., nope:], positions, inv_freq, factor)], -1)
    kv = x @ p["wkv_a"]
    latent = rms(kv[..., :rank], p["kv_norm"]["scale"], eps)
    k_rope = rotate_fn(kv[..., rank:], positions, inv_freq, factor)
    kvb = jnp.einsum("btr,rhk->bthk", latent, p["wkv_b"])
    k_nope, v = kvb[..., :nope], kvb[..., nope:]
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], (*k_nope.shape[:3],
                                                                     k_rope.shape[-1]))], -1)
    scores = jnp.einsum("bthk,bshk->bhts", q, k) * scale
    qp, kp = positions[:, :, None], positions[:, None, :]
    qs, ks = segment_ids[:, :, None], segment_ids[:, None, :]
    mask = (qp >= kp) & (qs == ks) & (ks != 0)
    if window is not None:
        mask &= qp - kp < window
    mask = mask[:, None]
    w = jnp.exp(jnp.where(mask, scores - scores.max(-1, keepdims=True), -jnp.inf))
    w = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-30)
    out = jnp.einsum("bhts,bshv->bthv", w, v)
    return jnp.einsum("bthv,hvd->btd", out, p["wo"])


def random_mixer_params(mixer, seed):
    """The mixer's pure parameters replaced by random values that make the softmax peaked
    enough to matter (matrices ~ 1/sqrt(fan_in), norm scales near 1)."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(mixer)
    pure = nnx.to_pure_dict(state)
    fan_in = {"wq": 0, "wq_a": 0, "wq_b": 0, "wkv_a": 0, "wkv_b": 0, "wo": (0, 1)}

    def one(path, a):
        name = path[0].key
        if name in ("q_norm", "kv_norm"):
            return jnp.asarray(1 + 0.2 * rng.normal(size=a.shape), jnp.float32)
        n = np.prod([a.shape[i] for i in np.atleast_1d(fan_in[name])])
        return jnp.asarray(rng.normal(size=a.shape) * 1.5 / np.sqrt(n), jnp.float32)

    return graphdef, state, jax.tree_util.tree_map_with_path(one, pure)


# Packed rows: two documents with positions restarting, then padding (segment 0).
SEGMENTS = np.array([[1] * 5 + [2] * 6 + [0] * 2, [1] * 11 + [0] * 2], np.int32)
POSITIONS = np.array([list(range(5)) + list(range(6)) + [0, 0], list(range(11)) + [0, 0]],
                     np.int32)

MIXER_CASES = {
    "no_q_lora_yarn_mscale": dict(q_lora_rank=0, yarn=True),
    "q_lora": dict(q_lora_rank=24),
    "q_lora_interleaved_rope": dict(q_lora_rank=24, interleave=True),
    "q_lora_chunked_window": dict(q_lora_rank=24, impl="xla_chunked", window=3),
}


@pytest.mark.parametrize("name", list(MIXER_CASES))
def test_training_form_matches_mla_math(name):
    case = MIXER_CASES[name]
    cfg = load_config("deepseek:tiny,model.dtype=float32").model
    cfg.update(d_model=40, num_heads=3, norm_eps=1e-5, max_seq_len=64,
               attention_impl=case.get("impl", "xla"), sliding_window=case.get("window", 0))
    cfg.mla.update(q_lora_rank=case["q_lora_rank"], kv_lora_rank=20, qk_nope_head_dim=12,
                   qk_rope_head_dim=8, v_head_dim=10, norm_eps=1e-5,
                   rope_interleave=case.get("interleave", False))
    scale = 20**-0.5
    if case.get("yarn"):
        cfg.rope_scaling.update(type="yarn", factor=4.0, original_max_position_embeddings=16,
                                mscale=0.8, mscale_all_dim=0.6)
        scale *= (0.1 * 0.6 * np.log(4.0) + 1) ** 2  # DeepSeek's softmax mscale
    inv_freq, factor = rope_frequencies(8, theta=cfg.rope_theta, scaling=cfg.rope_scaling,
                                        max_position=64)
    if case.get("yarn"):  # cos/sin scaled by m(mscale) / m(mscale_all_dim)
        assert factor == pytest.approx((0.08 * np.log(4) + 1) / (0.06 * np.log(4) + 1))
    mixer = MLA(cfg, rngs=nnx.Rngs(0))
    assert mixer.scale == pytest.approx(scale)
    graphdef, template, params = random_mixer_params(mixer, seed=1)
    assert ("wq" in params) == (case["q_lora_rank"] == 0)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 13, 40)), jnp.float32)
    positions, segments = jnp.asarray(POSITIONS), jnp.asarray(SEGMENTS)
    ct = jnp.asarray(np.random.default_rng(3).normal(size=(2, 13, 40)), jnp.float32)

    def ours(params, x):
        state = jax.tree.map(lambda v: v, template)
        nnx.replace_by_pure_dict(state, params)
        y, cache, aux = nnx.merge(graphdef, state)(x, SeqInfo(positions, segments))
        assert cache is None and aux == {}
        return jnp.sum(y * ct), y

    def reference(params, x):
        y = mla_reference(params, x, positions, segments, nope=12, rank=20, inv_freq=inv_freq,
                          factor=factor, scale=scale, eps=1e-5, window=case.get("window"),
                          interleave=case.get("interleave", False))
        return jnp.sum(y * ct), y

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
    (_, y), grads = grad(ours)(params, x)
    (_, y_ref), grads_ref = grad(reference)(params, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(y_ref)).max() > 0.1
    flat = jax.tree_util.tree_leaves_with_path(grads_ref)
    for (path, g_ref), g in zip(flat, jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


# -- the LM: absorbed cached decode == uncached forward ---------------------------------------


@functools.cache
def build(spec_text, seed=0):
    """(cfg, spec, params, apply), shared between tests (so are apply's compilations)."""
    cfg = load_config(spec_text)
    spec = ModelSpec(cfg.model)
    params = spec.init(seed, single_device_mesh(), make_rules())

    @jax.jit
    def apply(params, tokens, positions=None, segment_ids=None, cache=None):
        return spec.merge(params)(tokens, positions=positions, segment_ids=segment_ids,
                                  cache=cache)

    return cfg, spec, params, apply


@pytest.mark.parametrize("extra", ["", ",model.mla.q_lora_rank=0,model.sliding_window=4"],
                         ids=["q_lora", "no_q_lora_window4"])
def test_cached_decode_matches_full_forward(extra):
    """Prefill 5 tokens, a chunk of 3, then one token at a time through the absorbed form; with
    a window of 4 the cache is a ring of 4 slots."""
    length = 12
    cfg, spec, params, apply = build(TINY + extra)
    tokens = random_tokens((2, length), cfg.model.vocab_size, seed=10)
    full = apply(params, tokens).logits
    cache = spec.merge(params).init_cache(2, length)
    slots = 4 if "window" in extra else length
    assert cache["positions"].shape == (2, slots)
    check_cached_decode(apply, params, tokens, full, cache, (5, 3), dict(rtol=1e-4, atol=1e-4))


def test_right_padded_prefill_then_decode():
    """Prompts of 6 and 3 tokens in one right-padded prefill (padding never written), then
    decode steps continue each row from its own length."""
    cfg, spec, params, apply = build(TINY)
    rows = random_tokens((2, 9), cfg.model.vocab_size, seed=12)
    alone = apply(params, rows).logits
    lens = [6, 3]
    prompt = rows[:, :6].at[1, 3:].set(7)
    segment_ids = jnp.array([[1] * 6, [1] * 3 + [0] * 3], jnp.int32)
    out = apply(params, prompt, segment_ids=segment_ids,
                cache=spec.merge(params).init_cache(2, 12))
    for i, n in enumerate(lens):
        np.testing.assert_allclose(out.logits[i, :n], alone[i, :n], rtol=1e-4, atol=1e-4)
    cache = out.cache
    assert np.all(np.asarray(cache["layers"][0]["latent"])[:, 1, 3:] == 0)  # padding unwritten
    for step in range(3):
        nxt = jnp.stack([rows[0, 6 + step], rows[1, 3 + step]])[:, None]
        out = apply(params, nxt, cache=cache)
        cache = out.cache
        for i, n in enumerate(lens):
            np.testing.assert_allclose(out.logits[i, 0], alone[i, n + step], rtol=1e-4,
                                       atol=1e-4, err_msg=f"row {i} step {step}")


def test_engine_greedy_matches_uncached_forward_and_reports_the_latent_cache():
    """The decode engine (mixed prompt lengths, prefill in chunks of 4, decode loop) gives the
    argmax tokens of re-run uncached forwards; its cache is R + Dr values per token and layer."""
    cfg, spec, params, _ = build(TINY)
    prompts = [[1, 60, 61, 62, 63, 64], [1, 100], [1, *range(120, 133)]]
    decoder = Decoder(spec, params, single_device_mesh(), prefill_chunk=4, decode_chunk=3)
    stats = DecodeStats()
    out = decoder.generate(prompts, None, 8, stop_tokens=(), stats=stats)
    assert [c.tokens for c in out] == reference_greedy(spec, params, prompts, 8)
    m = cfg.model
    per_layer = m.mla.kv_lora_rank + m.mla.qk_rope_head_dim  # 64 + 16
    assert stats.cache.bytes_per_token == m.num_layers * per_layer * 4 + 4  # + slot position
    assert stats.cache.bytes_per_sequence == 4  # the row's length


def test_cache_holds_only_the_latent_and_rope_key():
    cfg, spec, params, _ = build(TINY)
    model = spec.merge(params)
    cache = model.init_cache(3, 20, jnp.bfloat16)
    (layer,) = cache["layers"]
    assert set(layer) == {"latent", "k_rope"}
    assert layer["latent"].shape == (2, 3, 20, 64) and layer["latent"].dtype == jnp.bfloat16
    assert layer["k_rope"].shape == (2, 3, 20, 16)
    axes = model.cache_axes()["layers"][0]
    assert axes["latent"] == ("layers", "cache_batch", "cache_length", "kv_lora")
    assert axes["k_rope"] == ("layers", "cache_batch", "cache_length", "head_dim")


# -- parameters, remat, FLOPs, presets, errors ----------------------------------------------------


def test_parameter_names_and_shapes():
    for extra, q in (("", {"wq_a": (128, 64), "q_norm": {"scale": (64,)}, "wq_b": (64, 4, 48)}),
                     (",model.mla.q_lora_rank=0", {"wq": (128, 4, 48)})):
        spec = ModelSpec(load_config(TINY + extra).model)
        mixer = jax.tree.map(lambda s: s.shape[1:], spec.shapes["units"]["blocks"][0]["mixer"])
        assert mixer == {**q, "wkv_a": (128, 80), "kv_norm": {"scale": (64,)},
                         "wkv_b": (64, 4, 64), "wo": (4, 32, 128)}
        names = spec.axis_names["units"]["blocks"][0]["mixer"]
        assert names["wkv_a"] == ("layers", "embed", "kv_lora")
        assert names["wkv_b"] == ("layers", "lora_rows", "heads", "head_dim")
        if "wq_a" in names:
            assert names["wq_a"] == ("layers", "embed", "q_lora")
            assert names["wq_b"] == ("layers", "lora_rows", "heads", "head_dim")
    rules = make_rules()
    assert rules["q_lora"] == () and rules["kv_lora"] == ()
    # The decompressions split their latent rows as parameters split embed (FSDP), so that no
    # MLA weight is whole on every device.
    assert rules["lora_rows"] == rules["embed"] == ("fsdp", "sequence", "expert")
    wkv_b = logical_to_spec(names["wkv_b"], rules, {"fsdp": 4, "expert": 2}, (2, 64, 4, 64))
    assert wkv_b == jax.sharding.PartitionSpec(None, ("fsdp", "expert"), None, None)


def test_minimal_remat_keeps_the_query_latent_and_output(capsys):
    """``minimal`` saves the tagged q, latent, rope key and head outputs, not the decompressed
    keys and values (unrolled: a scan's saved residuals do not show their names)."""
    assert {"query_proj", "kv_latent", "attn_out"} <= set(minimal_saved_names())
    spec = ModelSpec(load_config(TINY + ",model.remat=minimal,model.scan_layers=False").model)
    tokens = random_tokens((2, 8), 259, seed=3)

    def loss(p):
        return jnp.mean(spec.merge(p)(tokens).logits ** 2)

    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec.shapes)
    jax.ad_checkpoint.print_saved_residuals(loss, params)
    saved = capsys.readouterr().out
    layers = spec.cfg.num_layers
    assert saved.count("named 'kv_latent'") == 2 * layers  # latent and rope key of each layer
    assert saved.count("named 'query_proj'") == layers
    assert saved.count("named 'attn_out'") == layers
    assert saved.count("[2,8,4,48]") == layers  # q only: no per-head keys saved


@pytest.mark.parametrize("q_lora", [0, 96])
def test_flops_match_cost_analysis(q_lora):
    """The analytic training-form count vs XLA's for an unscanned model (norms, RoPE and the
    softmax are the few % XLA adds)."""
    cfg = load_config(
        "deepseek:tiny,model.dtype=float32,model.scan_layers=False,model.d_model=256,"
        "model.num_heads=4,model.mlp_dim=768,model.mla.kv_lora_rank=128,"
        f"model.mla.qk_nope_head_dim=64,model.mla.qk_rope_head_dim=32,model.mla.v_head_dim=64,"
        f"model.mla.q_lora_rank={q_lora}"
    ).model
    cfg.update(prefix=(), pattern=("mla:mlp",), num_layers=2)  # MLA only (MoE: test_moe.py)
    graphdef, state = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))
    b, t = 2, 128

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens).logits

    cost = jax.jit(forward).lower(state, jnp.zeros((b, t), jnp.int32)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    analytic = forward_flops_per_token(cfg, t) * b * t
    assert cost["flops"] == pytest.approx(analytic, rel=0.05)
    # The causal-half convention drops half of the scores and values.
    assert causal_saving_per_token(cfg, t) == 2 * 0.5 * 2 * t * 4 * (96 + 64)  # 2 layers


def test_published_presets():
    """Attention shapes of DeepSeek-V2-Lite and V3 (abstract shapes only): every MLA tensor has
    the size of its HF counterpart (q_proj or q_a_proj / q_b_proj, kv_a_proj_with_mqa,
    kv_b_proj, o_proj)."""
    for preset, d, layers, heads, q_lora, vocab, mlp, mscale in (
        ("v2_lite", 2048, 27, 16, 0, 102400, 10944, 0.707),
        ("v3", 7168, 61, 128, 1536, 129280, 18432, 1.0),
    ):
        cfg = load_config(f"deepseek:{preset}").model
        m = cfg.mla
        assert (cfg.d_model, cfg.num_layers, cfg.num_heads, m.q_lora_rank) == (
            d, layers, heads, q_lora)
        assert (m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (
            512, 128, 64, 128)
        assert (cfg.vocab_size, cfg.mlp_dim, cfg.max_seq_len) == (vocab, mlp, 163840)
        rs = cfg.rope_scaling
        assert (rs.type, rs.factor, rs.original_max_position_embeddings, rs.mscale,
                rs.mscale_all_dim) == ("yarn", 40.0, 4096, mscale, mscale)
        mixer = ModelSpec(cfg).shapes["units"]["blocks"][0]["mixer"]
        sizes = {k: int(np.prod(v.shape[1:])) for k, v in mixer.items() if k not in (
            "q_norm", "kv_norm")}
        hf = {"wkv_a": d * (512 + 64), "wkv_b": 512 * heads * (128 + 128), "wo": heads * 128 * d}
        if q_lora:
            hf.update(wq_a=d * q_lora, wq_b=q_lora * heads * 192)
        else:
            hf.update(wq=d * heads * 192)
        assert sizes == hf, preset
        # HF's yarn_apply_mscale: the softmax scale is 192^-0.5 * m(mscale_all_dim)^2.
        scale = MLA(cfg, rngs=nnx.Rngs(0)).scale if preset == "v2_lite" else None
        if scale is not None:
            assert scale == pytest.approx(192**-0.5 * (0.1 * 0.707 * np.log(40) + 1) ** 2)


@pytest.mark.parametrize("key, value, message", [
    ("mla.qk_rope_head_dim", 7, r"^model\.mla\.qk_rope_head_dim must be even"),
    ("mla.kv_lora_rank", 0, r"^model\.mla\.kv_lora_rank must be > 0, got 0$"),
    ("mla.v_head_dim", -1, r"^model\.mla\.v_head_dim must be > 0, got -1$"),
    ("mla.q_lora_rank", -2, r"^model\.mla\.q_lora_rank must be >= 0"),
    ("rope", False, r"^model\.rope=False: mla needs RoPE"),
    ("qk_norm", True, r"^model\.qk_norm=True is not supported by mla$"),
])
def test_config_errors(key, value, message):
    cfg = load_config(TINY).model
    parent, _, last = f"model.{key}".rpartition(".")
    (cfg.mla if parent == "model.mla" else cfg)[last] = value
    with pytest.raises(ValueError) as error:
        build_model(cfg, rngs=nnx.Rngs(0))
    assert re.search(message, str(error.value)) and "\n" not in str(error.value), error.value


@pytest.mark.slow
def test_tiny_config_trains(tmp_path):
    """30 steps on the embedded corpus (short rows, one device: the time is the compile)."""
    config = load_config(
        "deepseek:tiny,train.steps=30,train.progress=False,train.tensorboard=False,"
        "model.dtype=float32,data.seq_len=32,data.global_batch_size=8,optim.warmup_steps=0,"
        "checkpoint.async_save=False,eval.every=0"
    )
    result = train(config, str(tmp_path), devices=jax.devices()[:1])
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 1.0, losses
