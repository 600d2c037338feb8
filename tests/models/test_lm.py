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
from tessera.models.remat import POLICY_NAMES, minimal_saved_names, remat_policy
from tessera.sharding import make_mesh, make_rules, use_mesh
from tests.cached_decode import check_cached_decode
from tests.models.helpers import random_params, remat_policies_in

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


def build(cfg, seed=0):
    """(spec, params, apply): apply(params, tokens, **kw) is the jitted model call."""
    spec = ModelSpec(cfg)

    @jax.jit
    def apply(params, tokens, positions=None, segment_ids=None, cache=None):
        model = spec.merge(params)
        return model(tokens, positions=positions, segment_ids=segment_ids, cache=cache)

    return spec, random_params(spec, seed), apply


def random_tokens(shape, vocab, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


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
    spec16, _, apply16 = build(cfg16)
    assert {s.dtype for s in jax.tree.leaves(spec16.shapes)} == {jnp.dtype(jnp.float32)}
    tokens = random_tokens((2, 9), cfg32.vocab_size)
    want = np.asarray(apply32(params, tokens).logits)
    got = apply16(params, tokens).logits
    assert got.dtype == jnp.bfloat16
    got = np.asarray(got, np.float32)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 6e-2, rel
    assert rel > 0  # bf16 compute did happen


def test_scan_and_unrolled_stack_agree():
    """Same parameters, scanned vs unrolled: same logits and gradients. Three different blocks
    per unit (an MLP, an MoE and none), repeated twice; the unrolled one also remats ("full"),
    which must not change numbers either."""
    pattern = ("attention:mlp", "attention:moe", "attention:none")
    moe = dict(num_experts=4, expert_dim=16, aux_loss_coef=0.1)
    cfg_scan = model_cfg(pattern=pattern, num_layers=6, scan_layers=True, moe=moe)
    cfg_loop = model_cfg(pattern=pattern, num_layers=6, scan_layers=False, remat="full", moe=moe)
    spec_scan, params_scan, _ = build(cfg_scan)
    spec_loop = ModelSpec(cfg_loop)
    params_loop = dict(params_scan)
    params_loop["units"] = {
        i: jax.tree.map(lambda a, i=i: a[i], params_scan["units"]) for i in range(2)
    }
    assert jax.tree.structure(params_loop) == jax.tree.structure(spec_loop.shapes)
    assert "channel" not in params_loop["units"][0]["blocks"][2]

    tokens = random_tokens((2, 10), cfg_scan.vocab_size, seed=3)
    targets = random_tokens((2, 10), cfg_scan.vocab_size, seed=4)

    def loss_and_grad(spec, params):
        def loss(p):
            out = spec.merge(p)(tokens)
            return xent(out.logits, targets) + out.aux["moe_balance_loss"], out.logits

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
    # Each document run alone (with a tail of other tokens after doc_a: by causality its first 5
    # logits are doc_a's; one shape, one compile).
    doc_a = random_tokens((1, 7), cfg.vocab_size, seed=5)
    doc_b = random_tokens((1, 7), cfg.vocab_size, seed=6)
    alone_a, alone_b = apply(params, doc_a).logits[:, :5], apply(params, doc_b).logits
    tokens = jnp.concatenate([doc_a[:, :5], doc_b, jnp.full((1, 2), 3, jnp.int32)], axis=1)
    segment_ids = jnp.array([[1] * 5 + [2] * 7 + [0] * 2], jnp.int32)
    positions = jnp.array([list(range(5)) + list(range(7)) + [0, 1]], jnp.int32)
    packed = apply(params, tokens, positions=positions, segment_ids=segment_ids).logits
    np.testing.assert_allclose(packed[:, :5], alone_a, **TOL)
    np.testing.assert_allclose(packed[:, 5:12], alone_b, **TOL)
    # As one segment the second document sees the first, and its logits change.
    one_segment = jnp.ones_like(segment_ids)
    unpacked = apply(params, tokens, positions=positions, segment_ids=one_segment).logits
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


def test_positions_are_relative_and_order_matters():
    """RoPE: shifting every position by a constant leaves the logits unchanged (queries and keys
    are rotated alike), while swapping two tokens changes the logits after them."""
    cfg = model_cfg()
    _, params, apply = build(cfg)
    tokens = random_tokens((2, 8), cfg.vocab_size, seed=16)
    positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
    base = apply(params, tokens, positions=positions).logits
    shifted = apply(params, tokens, positions=positions + 37).logits
    np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-4)
    swapped = tokens.at[:, 0].set(tokens[:, 1]).at[:, 1].set(tokens[:, 0])
    assert not np.allclose(tokens, swapped)
    after = apply(params, swapped, positions=positions).logits
    assert not np.allclose(after[:, 2:], base[:, 2:], atol=1e-3)


# -- remat -----------------------------------------------------------------------------------


def test_remat_policies_agree():
    tokens = random_tokens((2, 8), SMALL["vocab_size"], seed=8)
    targets = random_tokens((2, 8), SMALL["vocab_size"], seed=9)
    results = {}
    for policy in ("none", "minimal", "save_dots", "full"):
        spec, params, _ = build(model_cfg(remat=policy))

        def loss(p, spec=spec):
            return xent(spec.merge(p)(tokens).logits, targets)

        # The named policy really wraps the scanned unit (and nothing is remat'd for "none").
        found = list(remat_policies_in(jax.make_jaxpr(loss)(params).jaxpr))
        want = [] if policy == "none" else [remat_policy(policy)]
        assert found == want, (policy, found)
        results[policy] = jax.jit(jax.value_and_grad(loss))(params)
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
    assert set(POLICY_NAMES) >= {"none", "minimal", "save_dots", "full"}
    # minimal keeps the tags every registered mixer declares, the state-space ones included
    assert {"query_proj", "mlp_out", "ssm_in", "ssm_out"} <= set(minimal_saved_names())
    _, params, apply = build(model_cfg(remat="everything"))
    with pytest.raises(ValueError, match="unknown policy 'everything'"):
        apply(params, jnp.zeros((1, 4), jnp.int32))


# -- cached decode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_kv_heads=4, tie_embeddings=True),  # MHA
        dict(num_kv_heads=2, qkv_bias=True, qk_norm=True),  # GQA, Qwen-style
        dict(num_kv_heads=1, remat="minimal"),  # MQA
        dict(num_kv_heads=2, sliding_window=4),
        # Unrolled stack of a two-block unit (one block without a channel mixer).
        dict(scan_layers=False, pattern=("attention:mlp", "attention:none"), num_layers=4),
        # Mixture of experts: tokens route alike one at a time or all at once (dropless).
        dict(pattern=("attention:moe",), moe=dict(num_experts=4, expert_dim=16,
                                                  num_shared_experts=1, shared_expert_dim=16,
                                                  shared_expert_gate=True)),
    ],
    ids=["mha_tied", "gqa_bias_qknorm", "mqa", "gqa_window4", "unrolled_hybrid", "moe"],
)
def test_cached_decode_matches_full_forward(overrides):
    """Prefill 5 tokens, a chunk of 3 more, then one token at a time; positions come from the
    cache. With sliding_window=4 the cache is a ring of 4 slots, overwritten from the prefill on."""
    length, prefill, chunk = 12, 5, 3
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
    repeats = cfg.num_layers // len(cfg.pattern)
    if cfg.scan_layers:  # one state per pattern block, stacked over the repeats
        assert len(cache["layers"]) == len(cfg.pattern)
        assert cache["layers"][-1]["k"].shape == (repeats, 2, slots, cfg.num_kv_heads, 8)
    else:  # one tuple of pattern-block states per repeat: every layer its own arrays
        assert len(cache["layers"]) == repeats
        assert all(len(unit) == len(cfg.pattern) for unit in cache["layers"])
        assert cache["layers"][-1][-1]["k"].shape == (2, slots, cfg.num_kv_heads, 8)

    cache = check_cached_decode(apply, params, tokens, full, cache, (prefill, chunk), TOL)
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
    rows = random_tokens((2, 7), cfg.vocab_size, seed=12)
    lens = [5, 3]
    # Reference: each row alone, uncached; by causality logit t depends on tokens <= t only.
    alone = [apply(params, rows[i : i + 1]).logits[0] for i in range(2)]
    pad = 7  # an arbitrary token under the padding
    prompt = rows[:, :5].at[1, 3:].set(pad)
    segment_ids = jnp.array([[1] * 5, [1] * 3 + [0] * 2], jnp.int32)
    out = apply(params, prompt, segment_ids=segment_ids, cache=model.init_cache(2, 10))
    cache = out.cache
    np.testing.assert_array_equal(cache["lengths"], lens)
    np.testing.assert_array_equal(cache["positions"][0, :6], [0, 1, 2, 3, 4, -1])
    np.testing.assert_array_equal(cache["positions"][1, :6], [0, 1, 2, -1, -1, -1])
    # Nothing was written where the padding would have gone.
    for kv in ("k", "v"):
        written = np.asarray(cache["layers"][0][kv][:, 1])  # [layers, S, Hkv, Dh] of row 1
        assert not np.any(written[:, 3:]) and np.all(np.any(written[:, :3], axis=(2, 3)))
    for i, n in enumerate(lens):
        np.testing.assert_allclose(out.logits[i, :n], alone[i][:n], **TOL)
    # Two decode steps; positions continue from each row's own length.
    for step in range(2):
        nxt = jnp.stack([rows[0, 5 + step], rows[1, 3 + step]])[:, None]
        out = apply(params, nxt, cache=cache)
        cache = out.cache
        for i, n in enumerate(lens):
            np.testing.assert_allclose(
                out.logits[i, 0], alone[i][n + step], **TOL, err_msg=f"row {i} step {step}"
            )
    np.testing.assert_array_equal(cache["lengths"], [7, 5])
    np.testing.assert_array_equal(cache["positions"][1, :6], [0, 1, 2, 3, 4, -1])


# -- sharding --------------------------------------------------------------------------------


def test_sharded_forward_matches_unsharded():
    config = load_config("llama:tiny,model.dtype=float32,mesh.data=2,mesh.fsdp=2,mesh.tensor=2")
    cfg = config.model
    cfg.update(**{**SMALL, "vocab_size": 64})
    mesh = make_mesh(config.mesh)
    rules = make_rules(config.mesh.rules)
    spec = ModelSpec(cfg)
    params = spec.init(0, mesh, rules)

    blocks = params["units"]["blocks"][0]
    expect = [
        (blocks["mixer"]["wq"], P(None, "fsdp", "tensor", None)),
        (blocks["mixer"]["wk"], P(None, "fsdp", "tensor", None)),
        (blocks["mixer"]["wo"], P(None, "tensor", None, "fsdp")),
        (blocks["channel"]["wi_gate"], P(None, "fsdp", "tensor")),
        (blocks["channel"]["wo"], P(None, "tensor", "fsdp")),
        (blocks["norm1"]["scale"], P(None, None)),
        (params["embed"]["embedding"], P("tensor", "fsdp")),
        (params["head"]["kernel"], P("fsdp", "tensor")),
    ]
    for array, pspec in expect:
        assert array.sharding.is_equivalent_to(NamedSharding(mesh, pspec), array.ndim), (
            array.sharding,
            pspec,
        )
    # Sharded per the rules, and really split: each device holds a quarter of wq.
    wq = blocks["mixer"]["wq"]
    assert wq.addressable_shards[0].data.shape == (2, 16, 2, 8)

    tokens = random_tokens((4, 8), cfg.vocab_size, seed=14)

    def forward(p):
        return spec.merge(p)(tokens).logits

    want = jax.jit(forward)(jax.device_get(params))
    with use_mesh(mesh, rules):
        got = jax.jit(forward)(params)
    # The logits come out sharded as their logical names say: batch over data x fsdp, vocab over
    # tensor; and they equal the single-device forward.
    assert got.sharding.is_equivalent_to(
        NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")), 3
    ), got.sharding
    np.testing.assert_allclose(got, want, **TOL)


# -- config errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(pattern=("attention:mlp", "mamba9:mlp")), "unknown mixer 'mamba9'"),
        (dict(pattern=("attention:moo",)), "unknown channel mixer 'moo'"),
        (dict(pattern=("attention:mlp", "attention:none"), num_layers=3),
         "num_layers=3 is not a positive multiple of the pattern length 2"),
        (dict(pattern=()), "model.pattern is empty"),
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
