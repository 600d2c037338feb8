"""The decoder LM: shapes and dtypes, scanned vs unrolled stack, packing, causality, remat
policies, cached decode against the full forward, sharded vs unsharded, and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tessera.configs import load_config
from tessera.models.create import ModelSpec
from tessera.models.registry import build_model
from tessera.models.remat import REMAT_POLICIES
from tessera.sharding import make_mesh, make_rules, use_mesh

# Small enough to compile fast; init_std large enough that attention is far from uniform, so a
# wrong mask or a misplaced cache entry moves the logits well past the tolerances below.
SMALL = dict(
    d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, vocab_size=61, init_std=0.3
)
TOL = dict(rtol=2e-5, atol=2e-5)


def model_cfg(spec="llama:tiny,model.dtype=float32", **overrides):
    cfg = load_config(spec).model
    cfg.update(**{**SMALL, **overrides})
    return cfg


def init_params(cfg, seed=0, std=0.1):
    """Jitted random init plus noise, so norm scales and biases are not 1 / 0."""

    @jax.jit
    def make():
        params = nnx.to_pure_dict(nnx.state(build_model(cfg, rngs=nnx.Rngs(seed))))
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        noisy = [p + std * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
        return jax.tree.unflatten(tree, noisy)

    return make()


def build(cfg, seed=0):
    """(spec, params, apply): apply(params, tokens, **kw) is the jitted model call."""
    spec = ModelSpec(cfg)

    @jax.jit
    def apply(params, tokens, positions=None, segment_ids=None, cache=None):
        model = spec.merge(params)
        return model(tokens, positions=positions, segment_ids=segment_ids, cache=cache)

    return spec, init_params(cfg, seed), apply


def random_tokens(shape, vocab, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, jnp.int32)


def xent(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


# -- forward ---------------------------------------------------------------------------------


def test_forward_shapes_and_dtypes():
    cfg = model_cfg()
    _, params, apply = build(cfg)
    out = apply(params, random_tokens((3, 7), cfg.vocab_size))
    assert out.logits.shape == (3, 7, cfg.vocab_size)
    assert out.logits.dtype == jnp.float32
    assert out.cache is None and out.aux == {}
    assert np.isfinite(np.asarray(out.logits)).all()


def test_bf16_compute_with_f32_params_is_close_to_f32():
    cfg32 = model_cfg()
    _, params, apply32 = build(cfg32)
    cfg16 = model_cfg(dtype="bfloat16", param_dtype="float32")
    model16 = build_model(cfg16, rngs=nnx.Rngs(0))
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model16, nnx.Param))} == {
        jnp.dtype(jnp.float32)
    }
    _, _, apply16 = build(cfg16)
    tokens = random_tokens((2, 9), cfg32.vocab_size)
    want = np.asarray(apply32(params, tokens).logits)
    got = apply16(params, tokens).logits
    assert got.dtype == jnp.bfloat16
    got = np.asarray(got, np.float32)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 3e-2, rel
    assert rel > 0  # bf16 compute did happen


def test_scan_and_unrolled_stack_agree():
    # Two different blocks per unit (one without a channel mixer), repeated twice.
    pattern = ("attention:mlp", "attention:none")
    cfg_scan = model_cfg(pattern=pattern, num_layers=4, scan_layers=True)
    cfg_loop = model_cfg(pattern=pattern, num_layers=4, scan_layers=False)
    spec_scan, params_scan, _ = build(cfg_scan)
    spec_loop = ModelSpec(cfg_loop)
    params_loop = dict(params_scan)
    params_loop["units"] = {
        i: jax.tree.map(lambda a, i=i: a[i], params_scan["units"]) for i in range(2)
    }
    assert jax.tree.structure(params_loop) == jax.tree.structure(spec_loop.shapes)
    assert "channel" not in params_loop["units"][0]["blocks"][1]

    tokens = random_tokens((2, 10), cfg_scan.vocab_size, seed=3)
    targets = random_tokens((2, 10), cfg_scan.vocab_size, seed=4)

    def loss_and_grad(spec, params):
        def loss(p):
            logits = spec.merge(p)(tokens).logits
            return xent(logits, targets), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (loss_s, logits_s), grads_s = loss_and_grad(spec_scan, params_scan)
    (loss_l, logits_l), grads_l = loss_and_grad(spec_loop, params_loop)
    np.testing.assert_allclose(logits_l, logits_s, **TOL)
    np.testing.assert_allclose(loss_l, loss_s, **TOL)
    for i in range(2):
        jax.tree.map(
            lambda gl, gs, i=i: np.testing.assert_allclose(gl, gs[i], **TOL),
            grads_l["units"][i],
            grads_s["units"],
        )
    for name in ("embed", "final_norm", "head"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), grads_l[name],
                     grads_s[name])
    # Each layer gets its own gradient (the stacked parameters are not shared).
    wq = grads_s["units"]["blocks"][0]["mixer"]["wq"]
    assert not np.allclose(wq[0], wq[1])


def test_packed_documents_match_separate_runs():
    cfg = model_cfg()
    _, params, apply = build(cfg)
    doc_a = random_tokens((1, 5), cfg.vocab_size, seed=5)
    doc_b = random_tokens((1, 7), cfg.vocab_size, seed=6)
    pad = jnp.zeros((1, 2), jnp.int32)
    tokens = jnp.concatenate([doc_a, doc_b, pad], axis=1)
    segment_ids = jnp.array([[1] * 5 + [2] * 7 + [0] * 2], jnp.int32)
    positions = jnp.array([list(range(5)) + list(range(7)) + [0, 0]], jnp.int32)
    packed = apply(params, tokens, positions=positions, segment_ids=segment_ids).logits
    np.testing.assert_allclose(packed[:, :5], apply(params, doc_a).logits, **TOL)
    np.testing.assert_allclose(packed[:, 5:12], apply(params, doc_b).logits, **TOL)
    # Without segment ids the second document sees the first, and its logits change.
    unpacked = apply(params, tokens, positions=positions).logits
    assert not np.allclose(unpacked[:, 5:12], packed[:, 5:12], atol=1e-3)


def test_causal():
    cfg = model_cfg()
    _, params, apply = build(cfg)
    tokens = random_tokens((2, 10), cfg.vocab_size, seed=7)
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % cfg.vocab_size)
    a, b = apply(params, tokens).logits, apply(params, changed).logits
    np.testing.assert_allclose(a[:, :6], b[:, :6], **TOL)
    for t in range(6, 10):
        assert not np.allclose(a[:, t], b[:, t], atol=1e-3), t


# -- remat -----------------------------------------------------------------------------------


def primitive_names(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if hasattr(sub, "eqns"):
                    yield from primitive_names(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from primitive_names(sub.jaxpr)


def test_remat_policies_agree():
    tokens = random_tokens((2, 8), SMALL["vocab_size"], seed=8)
    targets = random_tokens((2, 8), SMALL["vocab_size"], seed=9)
    results = {}
    for policy in ("none", "minimal", "save_dots", "full"):
        spec, params, _ = build(model_cfg(remat=policy))

        def loss(p, spec=spec):
            return xent(spec.merge(p)(tokens).logits, targets)

        grad_fn = jax.value_and_grad(loss)
        names = set(primitive_names(jax.make_jaxpr(grad_fn)(params).jaxpr))
        assert ("checkpoint" in names) == (policy != "none"), (policy, names)
        results[policy] = jax.jit(grad_fn)(params)
    loss_ref, grads_ref = results.pop("none")
    for policy, (loss_p, grads_p) in results.items():
        np.testing.assert_allclose(loss_p, loss_ref, rtol=1e-6, err_msg=policy)
        jax.tree.map(
            lambda a, b, policy=policy: np.testing.assert_allclose(
                a, b, rtol=1e-5, atol=1e-7, err_msg=policy
            ),
            grads_p,
            grads_ref,
        )


def test_unknown_remat_policy():
    assert set(REMAT_POLICIES) >= {"none", "minimal", "save_dots", "full"}
    cfg = model_cfg(remat="everything")
    with pytest.raises(ValueError, match="unknown policy 'everything'"):
        model = build_model(cfg, rngs=nnx.Rngs(0))
        model(jnp.zeros((1, 4), jnp.int32))


# -- cached decode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_kv_heads=4),  # MHA
        dict(num_kv_heads=2),  # GQA
        dict(num_kv_heads=1),  # MQA
        dict(qkv_bias=True, qk_norm=True),
        dict(tie_embeddings=True),
        dict(sliding_window=4),
    ],
    ids=["mha", "gqa", "mqa", "bias_qknorm", "tied", "window4"],
)
def test_cached_decode_matches_full_forward(overrides):
    length, prefill = 12, 6
    cfg = model_cfg(**overrides)
    spec, params, apply = build(cfg)
    model = spec.merge(params)
    if overrides.get("tie_embeddings"):
        assert "head" not in params
    if overrides.get("qkv_bias"):
        assert "bq" in params["units"]["blocks"][0]["mixer"]
    tokens = random_tokens((2, length), cfg.vocab_size, seed=10)
    full = apply(params, tokens).logits

    cache = model.init_cache(2, length)
    slots = 4 if cfg.sliding_window else length
    assert cache["positions"].shape == (2, slots)
    assert cache["layers"][0]["k"].shape == (cfg.num_layers, 2, slots, cfg.num_kv_heads, 8)

    out = apply(params, tokens[:, :prefill], cache=cache)
    np.testing.assert_allclose(out.logits, full[:, :prefill], **TOL)
    np.testing.assert_array_equal(out.cache["lengths"], [prefill, prefill])
    cache = out.cache
    for t in range(prefill, length):
        out = apply(params, tokens[:, t : t + 1], cache=cache)
        np.testing.assert_allclose(out.logits[:, 0], full[:, t], **TOL, err_msg=f"step {t}")
        cache = out.cache
    np.testing.assert_array_equal(cache["lengths"], [length, length])
    # Every slot holds one of the last `slots` positions.
    held = np.sort(np.asarray(cache["positions"]), axis=1)
    np.testing.assert_array_equal(held, np.tile(np.arange(length - slots, length), (2, 1)))


def test_sliding_window_mask_is_used():
    """The window changes the logits once the sequence is longer than the window."""
    cfg = model_cfg()
    _, params, apply = build(cfg)
    _, _, apply_w = build(model_cfg(sliding_window=4))
    tokens = random_tokens((1, 12), cfg.vocab_size, seed=11)
    full, windowed = apply(params, tokens).logits, apply_w(params, tokens).logits
    np.testing.assert_allclose(full[:, :4], windowed[:, :4], **TOL)
    assert not np.allclose(full[:, 4:], windowed[:, 4:], atol=1e-3)


def test_right_padded_prefill_then_decode():
    cfg = model_cfg()
    spec, params, apply = build(cfg)
    model = spec.merge(params)
    rows = [random_tokens((1, 7), cfg.vocab_size, seed=12), random_tokens((1, 5), cfg.vocab_size,
                                                                          seed=13)]
    lens = [5, 3]
    prompt = jnp.concatenate([rows[0][:, :5], jnp.pad(rows[1][:, :3], ((0, 0), (0, 2)))])
    segment_ids = jnp.array([[1] * 5, [1] * 3 + [0] * 2], jnp.int32)
    out = apply(params, prompt, segment_ids=segment_ids, cache=model.init_cache(2, 10))
    cache = out.cache
    np.testing.assert_array_equal(cache["lengths"], lens)
    np.testing.assert_array_equal(cache["positions"][0, :6], [0, 1, 2, 3, 4, -1])
    np.testing.assert_array_equal(cache["positions"][1, :6], [0, 1, 2, -1, -1, -1])
    # Nothing was written where the padding would have gone.
    k = cache["layers"][0]["k"]
    assert not np.any(np.asarray(k[:, 1, 3:])) and np.any(np.asarray(k[:, 1, :3]))
    for i, n in enumerate(lens):
        np.testing.assert_allclose(out.logits[i, :n], apply(params, rows[i][:, :n]).logits[0],
                                   **TOL)
    # Two decode steps; positions continue from each row's own length.
    for step in range(2):
        nxt = jnp.stack([rows[0][0, 5 + step], rows[1][0, 3 + step]])[:, None]
        out = apply(params, nxt, cache=cache)
        cache = out.cache
        for i, n in enumerate(lens):
            want = apply(params, rows[i][:, : n + step + 1]).logits[0, -1]
            np.testing.assert_allclose(out.logits[i, 0], want, **TOL, err_msg=f"row {i} {step}")
    np.testing.assert_array_equal(cache["lengths"], [7, 5])


# -- sharding --------------------------------------------------------------------------------


def test_sharded_forward_and_grad_match_unsharded():
    config = load_config("llama:tiny,model.dtype=float32,mesh.data=2,mesh.fsdp=2,mesh.tensor=2")
    cfg = config.model
    cfg.update(**{**SMALL, "vocab_size": 64})
    mesh = make_mesh(config.mesh)
    rules = make_rules(config.mesh.rules)
    spec = ModelSpec(cfg)
    params = spec.init(0, mesh, rules)

    blocks = params["units"]["blocks"][0]
    expect = {
        (blocks["mixer"]["wq"], P(None, "fsdp", "tensor", None)),
        (blocks["mixer"]["wk"], P(None, "fsdp", "tensor", None)),
        (blocks["mixer"]["wo"], P(None, "tensor", None, "fsdp")),
        (blocks["channel"]["wi_gate"], P(None, "fsdp", "tensor")),
        (blocks["channel"]["wo"], P(None, "tensor", "fsdp")),
        (blocks["norm1"]["scale"], P(None, None)),
        (params["embed"]["embedding"], P("tensor", "fsdp")),
        (params["head"]["kernel"], P("fsdp", "tensor")),
    }
    for array, pspec in expect:
        assert array.sharding.is_equivalent_to(NamedSharding(mesh, pspec), array.ndim), (
            array.sharding,
            pspec,
        )
    # Sharded per the rules, and really split: each device holds a quarter of wq.
    wq = blocks["mixer"]["wq"]
    assert wq.addressable_shards[0].data.shape == (2, 16, 2, 8)

    tokens = random_tokens((4, 8), cfg.vocab_size, seed=14)
    targets = random_tokens((4, 8), cfg.vocab_size, seed=15)

    def loss(p):
        logits = spec.merge(p)(tokens).logits
        return xent(logits, targets), logits

    step = jax.value_and_grad(loss, has_aux=True)
    host = jax.device_get(params)
    (loss_ref, logits_ref), grads_ref = jax.jit(step)(host)
    with use_mesh(mesh, rules):
        (loss_sh, logits_sh), grads_sh = jax.jit(step)(params)
    assert logits_sh.sharding.is_equivalent_to(
        NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")), 3
    ), logits_sh.sharding
    np.testing.assert_allclose(logits_sh, logits_ref, **TOL)
    np.testing.assert_allclose(loss_sh, loss_ref, **TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_sh,
                 grads_ref)


def test_spec_init_matches_eager_build():
    cfg = model_cfg()
    config = load_config("llama:tiny,mesh.data=8")
    params = ModelSpec(cfg).init(3, make_mesh(config.mesh), make_rules())
    eager = nnx.to_pure_dict(nnx.state(build_model(cfg, rngs=nnx.Rngs(3))))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, eager)


# -- config errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(pattern=("attention:mlp", "mamba9:mlp")), "unknown mixer 'mamba9'"),
        (dict(pattern=("attention:moo",)), "unknown channel mixer 'moo'"),
        (dict(pattern=("attention:mlp", "attention:none"), num_layers=3),
         "num_layers=3 is not a multiple of the pattern length 2"),
        (dict(pattern=()), "not a multiple of the pattern length 0"),
        (dict(num_heads=4, num_kv_heads=3), "num_heads=4 is not a multiple of num_kv_heads=3"),
    ],
)
@pytest.mark.parametrize("scan_layers", [True, False])
def test_config_errors(overrides, message, scan_layers):
    cfg = model_cfg(scan_layers=scan_layers, **overrides)
    with pytest.raises(ValueError, match=message):
        build_model(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=message):
        ModelSpec(cfg)
