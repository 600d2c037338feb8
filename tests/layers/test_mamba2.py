"""Mamba-2 mixer: Hugging Face semantics (numpy oracle), packing, padding, cached decode through
the LM (mamba2 and hybrid), cache shapes, sharding, training, FLOPs and configs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tessera.configs import load_config
from tessera.layers.mixers import Mamba2, SeqInfo
from tessera.models.create import ModelSpec
from tessera.models.registry import build_model
from tessera.sharding import make_mesh, make_rules, use_mesh
from tessera.train.flops import forward_flops_per_token
from tessera.train.trainer import train
from tests.cached_decode import build_lm, check_cached_decode, params_by_leaf, random_tokens

TOL = dict(rtol=2e-5, atol=2e-5)
MAMBA2 = "mamba2:tiny,model.dtype=float32"
HYBRID = "hybrid:tiny,model.dtype=float32"
# Chunks of 3 tokens, so prefills of 4 or 5 tokens cross a chunk boundary.
SHORT_CHUNKS = ",model.ssm.chunk_size=3"


def leaf_value(rng, name, shape):
    """A realistic random value for a parameter called ``name``."""
    if name == "A_log":
        return np.log(rng.uniform(1.0, 16.0, shape))
    if name == "dt_bias":  # softplus^-1 of dt in [0.01, 0.5]
        dt = np.exp(rng.uniform(np.log(0.01), np.log(0.5), shape))
        return dt + np.log(-np.expm1(-dt))
    if name in ("D", "norm_weight", "scale"):
        return 1.0 + 0.1 * rng.normal(size=shape)
    if name == "conv1d_weight":
        return rng.uniform(-0.5, 0.5, shape)
    if name == "embedding":
        return 0.3 * rng.normal(size=shape)
    if len(shape) >= 2:  # stacked matrices: 1 / sqrt(fan_in)
        return rng.normal(size=shape) / np.sqrt(shape[-2])
    return 0.1 * rng.normal(size=shape)  # biases


def random_params(spec, seed=0):
    return params_by_leaf(spec, leaf_value, seed)


@functools.cache
def build(spec_text, seed=0):
    """(cfg, params, apply, model), shared between tests (so are apply's compilations)."""
    return build_lm(spec_text, random_params, seed)


# -- the mixer against Hugging Face's semantics ---------------------------------------------------


def silu(a):
    return a / (1.0 + np.exp(-a))


def hf_mamba2_numpy(p, x, *, heads, groups, state, width, eps, dt_limit):
    """float64 numpy transcription of HF ``Mamba2Mixer.torch_forward`` (no cache) with torch's
    tensor layouts: in_proj [F, D], conv1d [Cc, 1, K]; grouped gated RMSNorm."""
    b, t, _ = x.shape
    d_inner = p["out_proj.weight"].shape[1]
    head_dim, gn = d_inner // heads, groups * state
    proj = x @ p["in_proj.weight"].T + p["in_proj.bias"]
    gate, xbc, dt = np.split(proj, [d_inner, 2 * d_inner + 2 * gn], axis=-1)
    # nn.Conv1d(groups=channels, padding=K-1), first T outputs: a cross-correlation.
    padded = np.concatenate([np.zeros((b, width - 1, xbc.shape[-1])), xbc], axis=1)
    w = p["conv1d.weight"][:, 0, :]  # [Cc, K]
    conv = sum(padded[:, k : k + t] * w[:, k] for k in range(width)) + p["conv1d.bias"]
    xs, bm, cm = np.split(silu(conv), [d_inner, d_inner + gn], axis=-1)
    xs = xs.reshape(b, t, heads, head_dim)
    bm, cm = bm.reshape(b, t, groups, state), cm.reshape(b, t, groups, state)
    dt = np.clip(np.logaddexp(0.0, dt + p["dt_bias"]), *dt_limit)
    a = -np.exp(p["A_log"])
    h = np.zeros((b, heads, head_dim, state))
    y = np.zeros_like(xs)
    for i in range(t):
        for hd in range(heads):
            g = hd // (heads // groups)
            h[:, hd] = np.exp(dt[:, i, hd, None, None] * a[hd]) * h[:, hd] + (
                dt[:, i, hd, None, None] * xs[:, i, hd, :, None] * bm[:, i, g, None, :]
            )
            y[:, i, hd] = np.einsum("bpn,bn->bp", h[:, hd], cm[:, i, g]) + p["D"][hd] * xs[:, i, hd]
    gated = (y.reshape(b, t, d_inner) * silu(gate)).reshape(b, t, groups, -1)
    gated = gated / np.sqrt(np.mean(gated**2, axis=-1, keepdims=True) + eps)
    out = gated.reshape(b, t, d_inner) * p["norm.weight"]
    return out @ p["out_proj.weight"].T + p["out_proj.bias"]


def test_mixer_matches_hf_semantics():
    """Our parameter layout mapped from HF's torch tensors gives HF's outputs (two groups,
    biases, a dt clamp that bites, 11 tokens over chunks of 4)."""
    cfg = load_config(MAMBA2).model
    cfg.update(d_model=24, norm_eps=1e-5)
    cfg.ssm.update(
        head_dim=8,
        num_groups=2,
        state_dim=4,
        bias=True,
        chunk_size=4,
        dt_limit_min=0.02,
        dt_limit_max=0.3,
    )
    mixer = Mamba2(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(mixer)
    rng = np.random.default_rng(1)
    ours = {k: leaf_value(rng, k, v.shape) for k, v in nnx.to_pure_dict(state).items()}
    assert ours["in_proj"].shape == (24, 2 * 48 + 2 * 2 * 4 + 6)
    assert ours["conv1d_weight"].shape == (4, 48 + 16)
    nnx.replace_by_pure_dict(state, {k: jnp.asarray(v, jnp.float32) for k, v in ours.items()})
    mixer = nnx.merge(graphdef, state)
    hf = {
        "in_proj.weight": ours["in_proj"].T,
        "in_proj.bias": ours["in_proj_bias"],
        "conv1d.weight": ours["conv1d_weight"].T[:, None, :],
        "conv1d.bias": ours["conv1d_bias"],
        "dt_bias": ours["dt_bias"],
        "A_log": ours["A_log"],
        "D": ours["D"],
        "norm.weight": ours["norm_weight"],
        "out_proj.weight": ours["out_proj"].T,
        "out_proj.bias": ours["out_proj_bias"],
    }
    x = rng.normal(size=(2, 11, 24))
    want = hf_mamba2_numpy(
        hf, x, heads=6, groups=2, state=4, width=4, eps=1e-5, dt_limit=(0.02, 0.3)
    )
    positions = jnp.broadcast_to(jnp.arange(11, dtype=jnp.int32), (2, 11))
    info = SeqInfo(positions, jnp.ones((2, 11), jnp.int32))
    got, cache, aux = jax.jit(lambda m, x: m(x, info))(mixer, jnp.asarray(x, jnp.float32))
    assert cache is None and aux == {}
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "ssm, message",
    [
        (dict(head_dim=48), r"d_inner = expand \* d_model = 256 is not a multiple of head_dim=48"),
        (dict(num_groups=3), "num_heads=8 is not a multiple of num_groups=3"),
    ],
)
def test_config_errors(ssm, message):
    cfg = load_config(MAMBA2).model
    cfg.ssm.update(**ssm)
    with pytest.raises(ValueError, match=message):
        build_model(cfg, rngs=nnx.Rngs(0))


# -- packing and padding -------------------------------------------------------------------------


def test_packed_row_matches_separate_documents():
    """Two documents and padding in one row give each document's own logits, whether positions
    restart per document or only the segment ids change; as one segment they do not."""
    cfg, params, apply, _ = build(MAMBA2 + SHORT_CHUNKS)
    docs = random_tokens((2, 7), cfg.vocab_size, seed=5)
    alone = apply(params, docs).logits  # each row is its own sequence
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


def test_mixer_padding_and_packed_gradients():
    """One mixer with a cache: right padding (with arbitrary inputs under it) leaves both cache
    arrays as after the last real token; gradients through packed rows are finite."""
    cfg = load_config(MAMBA2 + SHORT_CHUNKS).model
    mixer = Mamba2(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8, cfg.d_model))
    positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
    cache = Mamba2.init_cache(cfg, 2, 8, jnp.float32)
    call = jax.jit(lambda m, x, info, cache: m(x, info, cache))
    padded = jnp.array([[1] * 8, [1] * 5 + [0] * 3], jnp.int32)
    _, got, _ = call(mixer, x, SeqInfo(positions, padded), cache)
    _, want, _ = call(mixer, x[:, :5], SeqInfo(positions[:, :5], padded[:, :5]), cache)
    for name in ("conv", "ssm"):
        np.testing.assert_allclose(got[name][1], want[name][1], **TOL, err_msg=name)
        assert not np.allclose(got[name][0], want[name][0]), name

    packed = jnp.array([[1] * 2 + [2] * 3 + [3] * 3, [1] * 3 + [2] * 3 + [0] * 2], jnp.int32)
    graphdef, state = nnx.split(mixer)

    def loss(state, x):
        y, _, _ = nnx.merge(graphdef, state)(x, SeqInfo(positions, packed))
        return jnp.sum(y**2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


# -- cached decode ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec_text", [MAMBA2, HYBRID], ids=["mamba2", "hybrid"])
def test_cached_decode_matches_full_forward(spec_text):
    """Prefill 4 tokens, a chunk of 4 more (chunks of 3: both cross a chunk boundary), then one
    token at a time. (The hybrid's attention sums over cache slots in another order: 1e-4.)"""
    length, prefill = 12, 4
    cfg, params, apply, model = build(spec_text + SHORT_CHUNKS)
    tol = TOL if spec_text == MAMBA2 else dict(rtol=1e-4, atol=1e-4)
    tokens = random_tokens((2, length), cfg.vocab_size, seed=10)
    full = apply(params, tokens).logits
    check_cached_decode(apply, params, tokens, full, model.init_cache(2, length),
                        (prefill, prefill), tol)


def test_right_padded_prefill_then_decode():
    """Prompts of 5 and 3 tokens in one right-padded prefill, then two decode steps continue
    each row from its own length."""
    cfg, params, apply, model = build(MAMBA2 + SHORT_CHUNKS)
    rows = random_tokens((2, 7), cfg.vocab_size, seed=12)
    lens = [5, 3]
    alone = apply(params, rows).logits
    prompt = rows[:, :5].at[1, 3:].set(7)
    segment_ids = jnp.array([[1] * 5, [1] * 3 + [0] * 2], jnp.int32)
    out = apply(params, prompt, segment_ids=segment_ids, cache=model.init_cache(2, 10))
    cache = out.cache
    np.testing.assert_array_equal(cache["lengths"], lens)
    for i, n in enumerate(lens):
        np.testing.assert_allclose(out.logits[i, :n], alone[i, :n], **TOL)
    for step in range(2):
        nxt = jnp.stack([rows[0, 5 + step], rows[1, 3 + step]])[:, None]
        out = apply(params, nxt, cache=cache)
        cache = out.cache
        for i, n in enumerate(lens):
            np.testing.assert_allclose(
                out.logits[i, 0], alone[i, n + step], **TOL, err_msg=f"row {i} step {step}"
            )
    np.testing.assert_array_equal(cache["lengths"], [7, 5])


def test_cache_shapes_do_not_depend_on_length():
    _, _, _, model = build(MAMBA2 + SHORT_CHUNKS)
    short, long = model.init_cache(2, 16), model.init_cache(2, 4096)
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), short["layers"])
    assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), long["layers"])
    (layer,) = short["layers"]
    # [layers, B, K-1, d_inner + 2 G N] in the compute dtype; [layers, B, H, P, N] float32.
    assert layer["conv"].shape == (4, 2, 3, 256 + 2 * 16) and layer["conv"].dtype == jnp.float32
    assert layer["ssm"].shape == (4, 2, 8, 32, 16) and layer["ssm"].dtype == jnp.float32
    assert model.init_cache(2, 16, jnp.bfloat16)["layers"][0]["ssm"].dtype == jnp.float32
    axes = model.cache_axes()["layers"][0]
    assert axes["ssm"] == ("layers", "cache_batch", "cache_ssm_heads", "head_dim", "ssm_state")
    assert len(axes["conv"]) == layer["conv"].ndim


# -- sharding, training, FLOPs, configs ---------------------------------------------------------


def test_sharded_forward_matches_unsharded():
    """(fsdp=4, tensor=2): parameters made sharded per the rules; packed and padded rows."""
    config = load_config(MAMBA2 + ",mesh.data=1,mesh.fsdp=4,mesh.tensor=2")
    cfg = config.model
    mesh = make_mesh(config.mesh)
    rules = make_rules(config.mesh.rules)
    spec = ModelSpec(cfg)
    params = spec.init(0, mesh, rules)
    mixer = params["units"]["blocks"][0]["mixer"]
    expect = [
        (mixer["in_proj"], P(None, "fsdp", None)),
        (mixer["out_proj"], P(None, "tensor", "fsdp")),
        (mixer["A_log"], P(None, "tensor")),
        (mixer["conv1d_weight"], P(None, None, "fsdp")),  # FSDP only: channels mix x | B | C
    ]
    for array, pspec in expect:
        assert array.sharding.is_equivalent_to(NamedSharding(mesh, pspec), array.ndim), (
            array.sharding,
            pspec,
        )
    tokens = random_tokens((4, 16), cfg.vocab_size, seed=14)
    segment_ids = jnp.array([[1] * 16, [1] * 6 + [2] * 10, [1] * 12 + [0] * 4, [1] * 16])

    def forward(p):
        return spec.merge(p)(tokens, segment_ids=segment_ids).logits

    want = jax.jit(forward)(jax.device_get(params))
    with use_mesh(mesh, rules):
        got = jax.jit(forward)(params)
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mamba2", "hybrid"])
@pytest.mark.slow
def test_tiny_config_trains(name, tmp_path):
    """30 steps on the embedded corpus (short rows, one device: the time is the compile)."""
    config = load_config(
        f"{name}:tiny,train.steps=30,train.progress=False,train.tensorboard=False,"
        "model.dtype=float32,data.seq_len=32,data.global_batch_size=8,optim.warmup_steps=0,"
        "checkpoint.async_save=False,eval.every=0"
    )
    result = train(config, str(tmp_path), devices=jax.devices()[:1])
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 1.0, losses


def test_flops_match_cost_analysis():
    """XLA's count for the lowered (unoptimised) forward; it also counts the elementwise work
    (decay matrix, conv taps, norms) that the matmul-only counter leaves out: within 5%."""
    cfg = load_config(
        MAMBA2 + ",model.scan_layers=False,model.num_layers=2,model.d_model=256,"
        "model.ssm.head_dim=64"
    ).model
    model = build_model(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    b, t = 2, 128

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens).logits

    cost = jax.jit(forward).lower(state, jnp.zeros((b, t), jnp.int32)).cost_analysis()
    assert cost["flops"] == pytest.approx(forward_flops_per_token(cfg, t) * b * t, rel=0.05)


def test_presets():
    for name, params, layers in (("130m", 129e6, 24), ("2.7b", 2.7e9, 64)):
        cfg = load_config(f"mamba2:{name}").model
        assert cfg.family == "mamba2" and cfg.num_layers == layers and cfg.vocab_size == 50288
        assert cfg.ssm.state_dim == 128 and cfg.ssm.head_dim == 64
        assert ModelSpec(cfg).num_params() == pytest.approx(params, rel=0.03), name
    for preset in ("tiny", "small"):
        cfg = load_config(f"hybrid:{preset}").model
        assert cfg.family == "hybrid"
        assert cfg.pattern == ("mamba2:mlp",) * 3 + ("attention:mlp",)
