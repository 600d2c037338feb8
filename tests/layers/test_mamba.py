"""Mamba-1 mixer in the LM: parameters and their init, packed documents, cached decode (prefill,
chunks, steps, right-padded rows, restarts) against the full forward, constant-size cache,
sharded vs unsharded, the FLOP counter, and a few training steps of the tiny config."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tessera.configs import load_config
from tessera.layers.mixers import SeqInfo
from tessera.layers.mixers.mamba import Mamba, mamba_dims
from tessera.models.create import ModelSpec
from tessera.sharding import make_mesh, make_rules, use_mesh
from tessera.train.flops import forward_flops_per_token
from tessera.train.trainer import train
from tests.cached_decode import check_cached_decode, random_tokens

# Small enough to compile fast; chunks of 4 so prefills span several chunks and a padded one.
SMALL = dict(d_model=32, vocab_size=61, num_layers=2, init_std=0.2)
SSM = dict(state_dim=8, chunk_size=4)
TOL = dict(rtol=2e-5, atol=2e-5)


def model_cfg(spec="mamba:tiny,model.dtype=float32", **ssm):
    cfg = load_config(spec).model
    cfg.update(**SMALL)
    cfg.ssm.update(**{**SSM, **ssm})
    return cfg


def random_params(spec, seed=0):
    """Random parameters made on the host (fast; no init to compile): weights ~ N(0, init_std),
    norm scales and D ~ 1 + N(0, 0.1), A_log ~ log(1..N) + N(0, 0.1), dt biases giving steps
    log-uniform in [1e-3, 0.1] as at init; conv and dt biases non-zero too."""
    rng = np.random.default_rng(seed)

    def one(path, shape):
        name = path[-1].key
        noise = rng.normal(size=shape.shape)
        if name in ("scale", "D"):
            value = 1.0 + 0.1 * noise
        elif name == "A_log":
            value = np.log(np.arange(1, shape.shape[-1] + 1)) + 0.1 * noise
        elif name == "dt_proj_bias":
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), size=shape.shape))
            value = dt + np.log(-np.expm1(-dt))
        else:
            value = spec.cfg.init_std * noise
        return jnp.asarray(value, shape.dtype)

    return jax.tree_util.tree_map_with_path(one, spec.shapes)


@pytest.fixture(scope="module")
def lm():
    """(spec, params, apply) for the small float32 Mamba LM. ``apply`` fills in the defaults the
    LM would (segment ids 1, positions continuing the cache) so one compile serves each shape."""
    spec = ModelSpec(model_cfg())

    @jax.jit
    def forward(params, tokens, positions, segment_ids, cache):
        model = spec.merge(params)
        return model(tokens, positions=positions, segment_ids=segment_ids, cache=cache)

    def apply(params, tokens, positions=None, segment_ids=None, cache=None):
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            start = 0 if cache is None else cache["lengths"][:, None]
            positions = start + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        return forward(params, tokens, positions, segment_ids, cache)

    return spec, random_params(spec), apply


# -- parameters ------------------------------------------------------------------------------


def test_parameters_shapes_axes_and_init():
    cfg = model_cfg(bias=True, conv_bias=True, dt_rank=3)
    di, n, k, r = mamba_dims(cfg)
    assert (di, n, k, r) == (64, 8, 4, 3)
    assert mamba_dims(model_cfg())[3] == 2  # dt_rank 0: ceil(d_model / 16)
    mixer = Mamba(cfg, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(mixer))
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    assert shapes == {
        "in_proj": (32, 2, di),
        "in_proj_bias": (2, di),
        "conv_weight": (k, di),
        "conv_bias": (di,),
        "x_proj": (di, r + 2 * n),
        "dt_proj_weight": (r, di),
        "dt_proj_bias": (di,),
        "A_log": (di, n),
        "D": (di,),
        "out_proj": (di, 32),
        "out_proj_bias": (32,),
    }
    # Every parameter names all of its axes, with names the rules table knows.
    for name, var in nnx.to_flat_state(nnx.state(mixer)):
        axes = var.get_metadata()["logical_axes"]
        assert len(axes) == len(var.shape) and all(a in make_rules() for a in axes), name
    np.testing.assert_allclose(params["A_log"], np.log(np.tile(np.arange(1, n + 1), (di, 1))))
    np.testing.assert_array_equal(params["D"], np.ones(di))
    dt = np.asarray(jax.nn.softplus(params["dt_proj_bias"]))
    assert dt.min() >= cfg.ssm.dt_min * 0.999 and dt.max() <= cfg.ssm.dt_max * 1.001
    assert dt.max() / dt.min() > 10  # log-uniform over the range, not a constant
    no_bias = nnx.to_pure_dict(nnx.state(Mamba(model_cfg(conv_bias=False), rngs=nnx.Rngs(0))))
    assert not {"conv_bias", "in_proj_bias", "out_proj_bias"} & set(no_bias)


def hf_mixer(hidden, w):
    """Hugging Face ``MambaMixer.slow_forward`` (no cache) transcribed to numpy float64, on
    torch-layout tensors ``w`` (``in_proj.weight`` [2Di, D], ``conv1d.weight`` [Di, 1, K], ...)."""

    def silu(v):
        return v / (1 + np.exp(-v))

    t, k = hidden.shape[1], w["conv1d.weight"].shape[-1]
    n, r = w["A_log"].shape[1], w["dt_proj.weight"].shape[1]
    x, gate = np.split(hidden @ w["in_proj.weight"].T + w["in_proj.bias"], 2, axis=-1)
    padded = np.pad(x, ((0, 0), (k - 1, 0), (0, 0)))  # Conv1d(padding=K-1)[..., :T]
    conv = sum(padded[:, i : i + t] * w["conv1d.weight"][:, 0, i] for i in range(k))
    u = silu(conv + w["conv1d.bias"])
    step, B, C = np.split(u @ w["x_proj.weight"].T, [r, r + n], axis=-1)
    dt = np.log1p(np.exp(step @ w["dt_proj.weight"].T + w["dt_proj.bias"]))
    A = -np.exp(w["A_log"])
    h = np.zeros((hidden.shape[0], u.shape[-1], n))
    ys = []
    for i in range(t):
        h = np.exp(A * dt[:, i, :, None]) * h + (dt[:, i] * u[:, i])[..., None] * B[:, i, None]
        ys.append(np.einsum("bdn,bn->bd", h, C[:, i]))
    y = (np.stack(ys, axis=1) + u * w["D"]) * silu(gate)
    return y @ w["out_proj.weight"].T + w["out_proj.bias"]


def test_matches_hf_mixer_math():
    """Random torch-layout tensors, converted as the mixer's docstring says, give the output of
    the Hugging Face mixer's math (biases on, so every tensor is exercised)."""
    cfg = model_cfg(bias=True, conv_bias=True)
    di, n, k, r = mamba_dims(cfg)
    d = cfg.d_model
    rng = np.random.default_rng(0)
    hf = {
        "in_proj.weight": rng.normal(size=(2 * di, d)) * 0.2,
        "in_proj.bias": rng.normal(size=(2 * di,)) * 0.1,
        "conv1d.weight": rng.normal(size=(di, 1, k)) * 0.5,
        "conv1d.bias": rng.normal(size=(di,)) * 0.1,
        "x_proj.weight": rng.normal(size=(r + 2 * n, di)) * 0.2,
        "dt_proj.weight": rng.normal(size=(di, r)) * 0.5,
        "dt_proj.bias": rng.normal(size=(di,)) - 2.0,
        "A_log": np.log(np.arange(1, n + 1))[None].repeat(di, 0) + 0.1 * rng.normal(size=(di, n)),
        "D": 1 + 0.1 * rng.normal(size=(di,)),
        "out_proj.weight": rng.normal(size=(d, di)) * 0.2,
        "out_proj.bias": rng.normal(size=(d,)) * 0.1,
    }
    ours = {
        "in_proj": hf["in_proj.weight"].T.reshape(d, 2, di),
        "in_proj_bias": hf["in_proj.bias"].reshape(2, di),
        "conv_weight": hf["conv1d.weight"][:, 0, :].T,
        "conv_bias": hf["conv1d.bias"],
        "x_proj": hf["x_proj.weight"].T,
        "dt_proj_weight": hf["dt_proj.weight"].T,
        "dt_proj_bias": hf["dt_proj.bias"],
        "A_log": hf["A_log"],
        "D": hf["D"],
        "out_proj": hf["out_proj.weight"].T,
        "out_proj_bias": hf["out_proj.bias"],
    }
    mixer = nnx.eval_shape(lambda: Mamba(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(mixer)
    nnx.replace_by_pure_dict(state, {name: jnp.asarray(v, jnp.float32) for name, v in ours.items()})
    hidden = rng.normal(size=(2, 11, d))
    positions = jnp.broadcast_to(jnp.arange(11, dtype=jnp.int32), (2, 11))
    info = SeqInfo(positions, jnp.ones((2, 11), jnp.int32))

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x, info)[0]

    got = forward(state, jnp.asarray(hidden, jnp.float32))
    np.testing.assert_allclose(got, hf_mixer(hidden, hf), rtol=1e-5, atol=1e-5)


def test_presets_match_published_shapes():
    for preset, (d, layers) in {"130m": (768, 24), "1.4b": (2048, 48), "2.8b": (2560, 64)}.items():
        m = load_config(f"mamba:{preset}").model
        assert (m.d_model, m.num_layers, m.vocab_size, m.family) == (d, layers, 50280, "mamba")
        assert mamba_dims(m) == (2 * d, 16, 4, -(-d // 16))
        assert m.pattern == ("mamba:none",) and m.tie_embeddings
    # mamba-130m: 129.1M parameters with the tied embedding.
    assert ModelSpec(load_config("mamba:130m").model).num_params() == pytest.approx(129.1e6, 1e-3)


# -- forward ---------------------------------------------------------------------------------


def test_packed_documents_match_separate_runs(lm):
    """Row 0 packs two documents and padding; each document's logits equal a run of it alone
    (row 0 / row 1 of the reference: by causality the first tokens see only their document)."""
    spec, params, apply = lm
    vocab = spec.cfg.vocab_size
    doc_a, doc_b = random_tokens((1, 4), vocab, seed=1), random_tokens((1, 6), vocab, seed=2)
    pad = jnp.full((1, 2), 3, jnp.int32)
    alone = apply(
        params,
        jnp.concatenate(
            [jnp.concatenate([doc_a, doc_b, pad], 1), jnp.concatenate([doc_b, doc_a, pad], 1)]
        ),
    ).logits
    tokens = jnp.concatenate([doc_a, doc_b, pad], axis=1).repeat(2, axis=0)
    segment_ids = jnp.array([[1] * 4 + [2] * 6 + [0] * 2] * 2, jnp.int32)
    positions = jnp.array([list(range(4)) + list(range(6)) + [0, 1]] * 2, jnp.int32)
    packed = apply(params, tokens, positions=positions, segment_ids=segment_ids).logits
    np.testing.assert_allclose(packed[0, :4], alone[0, :4], **TOL)
    np.testing.assert_allclose(packed[0, 4:10], alone[1, :6], **TOL)
    # As one document the second one sees the first (through the state and the conv).
    unpacked = apply(params, tokens).logits
    assert not np.allclose(unpacked[0, 4:10], packed[0, 4:10], atol=1e-3)
    assert not np.allclose(unpacked[0, 4], packed[0, 4], atol=1e-3)


# -- cached decode ---------------------------------------------------------------------------


def test_cache_is_constant_size(lm):
    spec, _, _ = lm
    model = spec.merge(spec.shapes)
    short = jax.eval_shape(lambda: model.init_cache(2, 16))
    long = jax.eval_shape(lambda: model.init_cache(2, 4096))
    di, n, k, _ = mamba_dims(spec.cfg)
    layers = short["layers"][0]
    assert (layers["conv"].shape, layers["ssm"].shape) == ((2, 2, k - 1, di), (2, 2, di, n))
    assert layers["ssm"].dtype == jnp.float32
    shapes = jax.tree.map(lambda a: a.shape, (short["layers"], long["layers"]))
    assert shapes[0] == shapes[1]
    # Logical names for every cache array, one per axis, all known to the rules table.
    axes = model.cache_axes()["layers"][0]
    for name in ("conv", "ssm"):
        assert len(axes[name]) == layers[name].ndim
        assert all(a in make_rules() for a in axes[name])


def test_cached_decode_matches_full_forward(lm):
    """Prefill 5 tokens (two chunks of 4, one padded), a chunk of 3, then one token at a time;
    then restarting at position 0 on a used cache equals a fresh prefill."""
    spec, params, apply = lm
    model = spec.merge(params)
    length, prefill, chunk = 12, 5, 3
    tokens = random_tokens((2, length), spec.cfg.vocab_size, seed=3)
    full = apply(params, tokens).logits

    cache = check_cached_decode(apply, params, tokens, full, model.init_cache(2, length),
                                (prefill, chunk), TOL)

    positions = jnp.broadcast_to(jnp.arange(prefill, dtype=jnp.int32), (2, prefill))
    again = apply(params, tokens[:, :prefill], positions=positions, cache=cache)
    np.testing.assert_allclose(again.logits, full[:, :prefill], **TOL)


def test_right_padded_prefill_then_decode(lm):
    """Two prompts of lengths 5 and 2 in one right-padded prefill: each continues as if alone;
    the padding does not change the state; a step where a row is padding leaves its cache."""
    spec, params, apply = lm
    model = spec.merge(params)
    rows = random_tokens((2, 12), spec.cfg.vocab_size, seed=4)
    lens = [5, 2]
    alone = apply(params, rows).logits  # row i alone: by causality logit t sees tokens <= t
    prompt = rows[:, :5].at[1, 2:].set(7)
    segment_ids = jnp.array([[1] * 5, [1] * 2 + [0] * 3], jnp.int32)
    out = apply(params, prompt, segment_ids=segment_ids, cache=model.init_cache(2, 16))
    cache = out.cache
    np.testing.assert_array_equal(cache["lengths"], lens)
    for i, n in enumerate(lens):
        np.testing.assert_allclose(out.logits[i, :n], alone[i, :n], **TOL)
    # The padded row's state equals the state after its two tokens fed one at a time.
    short = model.init_cache(2, 16)
    for t in range(2):
        short = apply(params, rows[:, t : t + 1], cache=short).cache
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a[:, 1], b[:, 1], **TOL),
        cache["layers"],
        short["layers"],
    )

    for step in range(3):
        nxt = jnp.stack([rows[0, 5 + step], rows[1, 2 + step]])[:, None]
        seg = jnp.array([[1], [0 if step == 2 else 1]], jnp.int32)
        before = cache
        out = apply(params, nxt, segment_ids=seg, cache=cache)
        cache = out.cache
        np.testing.assert_allclose(out.logits[0, 0], alone[0, 5 + step], **TOL)
        if step < 2:
            np.testing.assert_allclose(out.logits[1, 0], alone[1, 2 + step], **TOL)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(a[:, 1], b[:, 1]),
        cache["layers"],
        before["layers"],
    )
    np.testing.assert_array_equal(cache["lengths"], [8, 4])


# -- sharding, FLOPs, training ---------------------------------------------------------------


def test_sharded_forward_matches_unsharded():
    config = load_config("mamba:tiny,model.dtype=float32,mesh.data=1,mesh.fsdp=4,mesh.tensor=2")
    cfg = config.model
    cfg.update(**SMALL)
    cfg.ssm.update(**SSM)
    mesh = make_mesh(config.mesh)
    rules = make_rules(config.mesh.rules)
    spec = ModelSpec(cfg)
    params = spec.init(0, mesh, rules)
    mixer = params["units"]["blocks"][0]["mixer"]
    expect = [
        (mixer["in_proj"], P(None, "fsdp", None, "tensor")),
        # No embed dimension: their inner dimension splits over fsdp too.
        (mixer["x_proj"], P(None, ("tensor", "fsdp"), None)),
        (mixer["A_log"], P(None, ("tensor", "fsdp"), None)),
        (mixer["out_proj"], P(None, "tensor", "fsdp")),
    ]
    for array, pspec in expect:
        assert array.sharding.is_equivalent_to(NamedSharding(mesh, pspec), array.ndim), pspec
    tokens = random_tokens((4, 10), cfg.vocab_size, seed=5)

    def forward(p):
        return spec.merge(p)(tokens).logits

    want = jax.jit(forward)(jax.device_get(params))
    with use_mesh(mesh, rules):
        got = jax.jit(forward)(params)
    np.testing.assert_allclose(got, want, **TOL)


def test_flops_match_cost_analysis(monkeypatch):
    """The analytic count against XLA's count of the lowered, unscanned forward, within 5%; and
    what a larger state adds (which isolates the per-state-element terms) within 5% too.

    XLA counts a while loop's body once, not once per trip, so every ``lax.scan`` is unrolled
    here and the recurrence is the sequential form: the work the model needs, which the count
    states (the chunked form's associative scan does about twice the elementwise work; that is
    the implementation's, not the model's). A FLOP more or less per state element is ~10% of
    what the larger state adds, so it fails the second check."""
    monkeypatch.setattr(jax.lax, "scan", functools.partial(jax.lax.scan, unroll=True))
    b, t = 2, 16

    def counts(state_dim):
        """(XLA's FLOPs, the analytic FLOPs) of a forward on [b, t] tokens."""
        cfg = model_cfg(impl="sequential", state_dim=state_dim)
        cfg.update(scan_layers=False)
        spec = ModelSpec(cfg)

        def forward(params, tokens):
            return spec.merge(params)(tokens).logits

        tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
        cost = jax.jit(forward).lower(spec.shapes, tokens).cost_analysis()
        return cost["flops"], forward_flops_per_token(cfg, t) * b * t

    xla_small, analytic_small = counts(64)
    xla, analytic = counts(128)
    assert xla == pytest.approx(analytic, rel=0.05)
    assert xla - xla_small == pytest.approx(analytic - analytic_small, rel=0.05)


@pytest.mark.slow
def test_tiny_config_trains(tmp_path):
    config = load_config(
        "mamba:tiny,train.steps=30,train.progress=False,train.tensorboard=False,"
        "model.dtype=float32,checkpoint.async_save=False,data.seq_len=32,data.global_batch_size=8,eval.every=0"
    )
    result = train(config, str(tmp_path))
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 0.5, losses
