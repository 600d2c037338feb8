"""The MoE channel mixer: routing against a numpy reference, the ragged dispatch against the dense
oracle through the whole layer (forward and gradients), auxiliary losses and statistics,
capacity drops counted by hand, config errors and the active-FLOP count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tessera.configs import load_config
from tessera.layers.mixers import CHANNEL_MIXERS, SeqInfo
from tessera.layers.moe import MoE
from tessera.layers.routing import route
from tessera.models.create import ModelSpec
from tessera.models.registry import build_model
from tessera.sharding.rules import default_rules
from tessera.train.flops import forward_flops_per_token

D = 16
TOL = dict(rtol=2e-5, atol=2e-5)


def moe_cfg(**moe):
    cfg = load_config("llama:tiny,model.dtype=float32").model
    cfg.update(d_model=D, init_std=0.3)
    cfg.moe.update(num_experts=8, num_experts_per_tok=2, expert_dim=12, aux_loss_coef=0.0)
    cfg.moe.update(**moe)
    return cfg


def info_of(segment_ids):
    b, t = segment_ids.shape
    return SeqInfo(jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.asarray(segment_ids, jnp.int32))


def inputs(b=3, t=7, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(b, t, D)), jnp.float32)
    segments = np.ones((b, t), np.int32)
    segments[-1, -3:] = 0  # padding at the end of the last row
    return x, segments


def build(cfg, seed=0, bias=None):
    model = MoE(cfg, rngs=nnx.Rngs(seed))
    if bias is not None:
        model.router_bias[...] = jnp.asarray(bias, jnp.float32)
    return model


# -- routing against numpy ---------------------------------------------------------------------


def numpy_route(logits, k, score_func="softmax", bias=None, n_group=1, topk_group=1,
                group_score="max", norm_topk_prob=True, routed_scaling_factor=1.0):
    logits = np.asarray(logits, np.float64)
    if score_func == "softmax":
        z = np.exp(logits - logits.max(-1, keepdims=True))
        scores = z / z.sum(-1, keepdims=True)
    else:
        scores = 1 / (1 + np.exp(-logits))
    e = scores.shape[-1]
    ids, weights = [], []
    for s in scores.reshape(-1, e):
        choice = s + (0 if bias is None else np.asarray(bias))
        if n_group > 1:
            groups = choice.reshape(n_group, -1)
            g = groups.max(-1) if group_score == "max" else np.sort(groups, -1)[:, -2:].sum(-1)
            best = np.argsort(-g, kind="stable")[:topk_group]
            allowed = np.repeat(np.isin(np.arange(n_group), best), e // n_group)
            choice = np.where(allowed, choice, -np.inf)
        top = np.argsort(-choice, kind="stable")[:k]
        w = s[top]
        if norm_topk_prob:
            w = w / w.sum()
        ids.append(top)
        weights.append(w * routed_scaling_factor)
    shape = (*logits.shape[:-1], k)
    return np.reshape(weights, shape), np.reshape(ids, shape), scores


ROUTES = {
    "softmax": dict(k=2),
    "softmax_k3_unnormalised": dict(k=3, norm_topk_prob=False),
    "sigmoid_scaled": dict(k=2, score_func="sigmoid", routed_scaling_factor=2.5),
    "v2_group_max": dict(k=3, n_group=4, topk_group=2, group_score="max", norm_topk_prob=False,
                         routed_scaling_factor=16.0),
    "v3_group_top2_sum_bias": dict(k=4, score_func="sigmoid", n_group=4, topk_group=2,
                                   group_score="top2_sum", bias=np.linspace(-0.3, 0.3, 8)),
}


@pytest.mark.parametrize("name", list(ROUTES))
def test_route_matches_numpy(name):
    args = ROUTES[name]
    logits = np.random.default_rng(1).normal(size=(5, 6, 8)) * 2
    bias = args.get("bias")
    kwargs = {**args, "bias": None if bias is None else jnp.asarray(bias, jnp.float32)}
    weights, ids, scores = route(jnp.asarray(logits, jnp.float32), **kwargs)
    want_w, want_ids, want_scores = numpy_route(logits, **args)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    if args.get("n_group", 1) > 1:  # the picks come from topk_group groups only
        groups = np.asarray(ids) // 2
        assert all(len(set(g)) <= args["topk_group"] for g in groups.reshape(-1, args["k"]))


def test_group_limit_changes_the_choice():
    """Expert 7 has the best single score but its group (6, 7) the worst top-2 sum: group-
    limited routing passes it over, plain top-k takes it."""
    scores = np.array([0.60, 0.55, 0.50, 0.45, 0.40, 0.35, 0.01, 0.90])
    logits = jnp.asarray(np.log(scores / (1 - scores)), jnp.float32)[None]  # sigmoid -> scores
    _, plain, _ = route(logits, k=2, score_func="sigmoid")
    _, limited, _ = route(logits, k=2, score_func="sigmoid", n_group=4, topk_group=2,
                          group_score="top2_sum")
    assert list(plain[0]) == [7, 0]
    assert list(limited[0]) == [0, 1]  # groups (0, 1) = 1.15 and (2, 3) = 0.95 beat (6, 7) = 0.91


def test_bias_moves_the_choice_not_the_weights():
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
    bias = jnp.asarray([0.0, 0.0, 0.0, 1.0])
    weights, ids, scores = route(logits, k=2, score_func="sigmoid", bias=bias,
                                 norm_topk_prob=False)
    # sigmoid(-1) + 1 = 1.27 beats sigmoid(2) = 0.88 and sigmoid(1) = 0.73
    assert list(ids[0]) == [3, 0]
    np.testing.assert_allclose(weights[0], jax.nn.sigmoid(jnp.asarray([-1.0, 2.0])), rtol=1e-6)


# -- the layer: ragged against dense -------------------------------------------------------------

LAYERS = {
    "softmax_aux_and_z_losses": dict(aux_loss_coef=0.1, z_loss_coef=0.01),
    "sigmoid_groups_bias_scaled": dict(score_func="sigmoid", n_group=4, topk_group=2,
                                       group_score="top2_sum", router_bias=True,
                                       routed_scaling_factor=2.5),
    "v2_groups_unnormalised": dict(n_group=4, topk_group=2, norm_topk_prob=False,
                                   routed_scaling_factor=4.0, num_experts_per_tok=3),
    "shared_with_gate": dict(num_shared_experts=1, shared_expert_dim=24, shared_expert_gate=True),
    "shared_without_gate_top1": dict(num_shared_experts=2, shared_expert_dim=20,
                                     num_experts_per_tok=1, norm_topk_prob=False),
}


def layer_value_and_grads(cfg, x, segments, bias=None):
    model = build(cfg, bias=bias)
    graphdef, state = nnx.split(model)

    def loss(state, x):
        y, aux = nnx.merge(graphdef, state)(x, info_of(segments))
        losses = sum((v for k, v in aux.items() if k.endswith("_loss")), 0.0)
        mask = jnp.asarray(segments > 0, jnp.float32)[..., None]
        return jnp.sum(jnp.sin(y) * mask) + losses, (y, aux)

    (_, (y, aux)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        state, x
    )
    return y, aux, grads


@pytest.mark.parametrize("name", list(LAYERS))
def test_ragged_layer_matches_dense(name):
    overrides = LAYERS[name]
    x, segments = inputs(seed=3)
    bias = np.linspace(0.2, -0.2, 8) if overrides.get("router_bias") else None
    y_r, aux_r, (gs_r, gx_r) = layer_value_and_grads(moe_cfg(**overrides), x, segments, bias)
    y_d, aux_d, (gs_d, gx_d) = layer_value_and_grads(moe_cfg(impl="dense", **overrides), x,
                                                     segments, bias)
    real = segments > 0
    np.testing.assert_allclose(np.asarray(y_r)[real], np.asarray(y_d)[real], **TOL)
    assert set(aux_r) == set(aux_d)
    for key in aux_r:
        np.testing.assert_allclose(aux_r[key], aux_d[key], **TOL)
    np.testing.assert_allclose(gx_r, gx_d, **TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), gs_r, gs_d)
    grads = nnx.to_pure_dict(gs_r)
    assert np.abs(np.asarray(grads["router"])).max() > 1e-4  # the router learns
    if "router_bias" in grads:  # used for the choice only: no gradient
        np.testing.assert_array_equal(grads["router_bias"], 0.0)
    if overrides.get("num_shared_experts"):
        assert set(grads["shared"]) == {"wi_gate", "wi_up", "wo"}
        assert grads["shared"]["wi_gate"].shape == (D, overrides["shared_expert_dim"])
        assert ("shared_gate" in grads) == overrides.get("shared_expert_gate", False)


def numpy_layer(model, x, segments):
    """The whole layer in numpy: numpy_route, each selected expert, the gated shared MLP."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(model)))
    logits = np.asarray(x, np.float64) @ p["router"]
    weights, ids, _ = numpy_route(logits, bias=p.get("router_bias"), **model.route_args)
    silu = lambda v: v / (1 + np.exp(-v))
    ffn = lambda v, wg, wu, wo: (silu(v @ wg) * (v @ wu)) @ wo
    out = np.zeros(x.shape)
    for b, t in np.ndindex(*x.shape[:2]):
        v = np.asarray(x[b, t], np.float64)
        if segments[b, t]:
            for w, e in zip(weights[b, t], ids[b, t]):
                out[b, t] += w * ffn(v, p["wi_gate"][e], p["wi_up"][e], p["wo"][e])
        if "shared" in p:
            s = p["shared"]
            gate = 1 / (1 + np.exp(-(v @ p["shared_gate"]))) if "shared_gate" in p else 1.0
            out[b, t] += gate * ffn(v, s["wi_gate"], s["wi_up"], s["wo"])
    return out


def test_layer_matches_numpy():
    cfg = moe_cfg(score_func="sigmoid", n_group=2, topk_group=1, group_score="top2_sum",
                  router_bias=True, routed_scaling_factor=1.5, num_shared_experts=1,
                  shared_expert_dim=24, shared_expert_gate=True)
    model = build(cfg, bias=np.linspace(-0.1, 0.1, 8))
    x, segments = inputs(seed=4)
    y, _ = model(x, info_of(segments))
    np.testing.assert_allclose(y, numpy_layer(model, x, segments), rtol=1e-5, atol=1e-5)


# -- auxiliary losses and statistics ------------------------------------------------------------


def test_aux_losses_and_load_match_numpy_without_padding():
    cfg = moe_cfg(aux_loss_coef=0.3, z_loss_coef=0.02)
    model = build(cfg)
    x, segments = inputs(seed=5)
    _, aux = model(x, info_of(segments))
    real = segments > 0
    logits = np.asarray(x, np.float64)[real] @ np.asarray(model.router[...], np.float64)
    _, ids, probs = numpy_route(logits, k=2)
    f = np.bincount(ids.ravel(), minlength=8) / ids.size
    balance = 8 * np.sum(f * probs.mean(0))
    lse = np.log(np.exp(logits).sum(-1))
    assert set(aux) == {"expert_load", "dropped_fraction", "moe_balance_loss", "moe_z_loss"}
    np.testing.assert_allclose(aux["expert_load"], 8 * f, rtol=1e-6)
    np.testing.assert_allclose(aux["moe_balance_loss"], 0.3 * balance, rtol=1e-5)
    np.testing.assert_allclose(aux["moe_z_loss"], 0.02 * np.mean(lse**2), rtol=1e-5)
    assert float(aux["dropped_fraction"]) == 0.0
    # Padding takes no part: other values under it change nothing.
    noisy = x.at[-1, -3:].set(50.0)
    _, aux_noisy = model(noisy, info_of(segments))
    for key in aux:
        np.testing.assert_allclose(aux_noisy[key], aux[key], rtol=1e-6)


def test_sigmoid_balance_loss_uses_normalised_scores():
    cfg = moe_cfg(score_func="sigmoid", aux_loss_coef=1.0)
    model = build(cfg)
    x, segments = inputs(seed=6)
    _, aux = model(x, info_of(segments))
    logits = np.asarray(x, np.float64)[segments > 0] @ np.asarray(model.router[...], np.float64)
    _, ids, scores = numpy_route(logits, k=2, score_func="sigmoid")
    f = np.bincount(ids.ravel(), minlength=8) / ids.size
    p = (scores / scores.sum(-1, keepdims=True)).mean(0)
    np.testing.assert_allclose(aux["moe_balance_loss"], 8 * np.sum(f * p), rtol=1e-5)


@pytest.mark.parametrize("loss_key, coef", [("aux_loss_coef", 1.0), ("z_loss_coef", 0.1)])
def test_aux_losses_reach_the_router_gradient(loss_key, coef):
    x, segments = inputs(seed=7)
    _, aux, (grads_with, _) = layer_value_and_grads(moe_cfg(**{loss_key: coef}), x, segments)
    _, _, (grads_without, _) = layer_value_and_grads(moe_cfg(), x, segments)
    assert any(k.endswith("_loss") for k in aux)
    router_with = nnx.to_pure_dict(grads_with)["router"]
    router_without = nnx.to_pure_dict(grads_without)["router"]
    assert np.abs(np.asarray(router_with) - np.asarray(router_without)).max() > 1e-3
    # The loss does not reach the experts: their gradients come from the output alone.
    np.testing.assert_allclose(nnx.to_pure_dict(grads_with)["wo"],
                               nnx.to_pure_dict(grads_without)["wo"], **TOL)


# -- capacity -----------------------------------------------------------------------------------

# Router = 10 x identity on 4 dims and 4 experts: a token 3 e_a + 2 e_b picks experts (a, b).
ROW0 = [(0, 1), (0, 2), (0, 1), (1, 0), (0, 3), (2, 3)]
ROW1 = [(3, 2)] * 6  # the last two are padding


def capacity_model(capacity_factor, impl="auto"):
    cfg = load_config("llama:tiny,model.dtype=float32").model
    cfg.update(d_model=4, init_std=0.5)
    cfg.moe.update(num_experts=4, num_experts_per_tok=2, expert_dim=6, aux_loss_coef=0.0,
                   capacity_factor=capacity_factor, impl=impl)
    model = MoE(cfg, rngs=nnx.Rngs(1))
    model.router[...] = 10 * jnp.eye(4)
    x = np.zeros((2, 6, 4), np.float32)
    for b, row in enumerate((ROW0, ROW1)):
        for t, (a, c) in enumerate(row):
            x[b, t, a], x[b, t, c] = 3.0, 2.0
    segments = np.array([[1] * 6, [1] * 4 + [0] * 2])
    return model, jnp.asarray(x), segments


def test_capacity_drops_match_a_hand_count():
    """capacity_factor 0.5: ceil(0.5 * 6 * 2 / 4) = 2 assignments per expert per row. Row 0,
    first choices in order: 0, 0 kept, 0 dropped (t2), 1 kept, 0 dropped (t4), 2 kept; second
    choices: 1 kept (t0), 2 kept (t1), 1 dropped (t2: expert 1 has t3 and t0), 0 dropped (t3),
    3 kept, 3 kept: 4 of 12 dropped. Row 1 (4 real tokens): 3 kept twice then dropped twice,
    2 the same: 4 of 8. Dropped fraction 8 / 20."""
    model, x, segments = capacity_model(0.5)
    y, aux = model(x, info_of(segments))
    np.testing.assert_allclose(aux["dropped_fraction"], 8 / 20, rtol=1e-6)
    # The load is the router's choice before drops: experts 0-3 get 5, 3, 6, 6 of the 20.
    np.testing.assert_allclose(aux["expert_load"], 4 * np.array([5, 3, 6, 6]) / 20, rtol=1e-6)
    # Dropped assignments contribute zero: the output is the dense reference over the kept ones.
    keep = np.ones((2, 6, 2), bool)
    for b, t, j in [(0, 2, 0), (0, 4, 0), (0, 2, 1), (0, 3, 1), (1, 2, 0), (1, 3, 0), (1, 2, 1),
                    (1, 3, 1)]:
        keep[b, t, j] = False
    weights, ids, _ = route(jnp.einsum("btd,de->bte", x, model.router[...]), k=2)
    from tessera.kernels.moe import experts

    kept_ids = jnp.where(keep, ids, 4).reshape(12, 2)
    want = experts(x.reshape(12, 4), kept_ids, weights.reshape(12, 2), model.wi_gate[...],
                   model.wi_up[...], model.wo[...], impl="dense").reshape(2, 6, 4)
    real = segments > 0
    np.testing.assert_allclose(np.asarray(y)[real], np.asarray(want)[real], **TOL)
    np.testing.assert_array_equal(np.asarray(y)[0, 2], 0.0)  # both of t2's assignments dropped
    np.testing.assert_array_equal(np.asarray(y)[1, 3], 0.0)
    dense, _ = capacity_model(0.5, impl="dense")[0](x, info_of(segments))
    np.testing.assert_allclose(np.asarray(dense)[real], np.asarray(y)[real], **TOL)
    # Dropless, every assignment counts.
    model, _, _ = capacity_model(0.0)
    y_all, aux_all = model(x, info_of(segments))
    assert float(aux_all["dropped_fraction"]) == 0.0
    assert np.abs(np.asarray(y_all)[0, 2]).max() > 1e-3


# -- errors, registration, FLOPs -----------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (dict(num_experts=4, num_experts_per_tok=5),
     "model.moe.num_experts_per_tok=5 must be between 1 and num_experts=4"),
    (dict(n_group=2, topk_group=3), "model.moe.topk_group=3 must be between 1 and n_group=2"),
    (dict(num_experts=6, n_group=4), "model.moe.num_experts=6 is not divisible by n_group=4"),
    (dict(score_func="relu"), "model.moe.score_func: unknown 'relu'; known: softmax, sigmoid"),
    (dict(n_group=2, group_score="mean"), "model.moe.group_score: unknown 'mean'"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3),
     "model.moe.num_experts_per_tok=3 exceeds the 2 experts of topk_group=1 groups of 2"),
    (dict(n_group=8, topk_group=2, group_score="top2_sum"),
     "model.moe.group_score=top2_sum needs 2 or more experts per group"),
    (dict(num_shared_experts=1), "model.moe.shared_expert_dim=0 must be positive"),
    (dict(shared_expert_gate=True), "model.moe.shared_expert_gate needs a shared expert"),
    (dict(capacity_factor=-1.0), "model.moe.capacity_factor=-1.0 must be >= 0"),
    (dict(impl="pallas"), "model.moe.impl: unknown 'pallas'; known: auto, megablox, ragged, dense"),
])
def test_config_errors_at_build(overrides, message):
    cfg = moe_cfg(**overrides)
    cfg.pattern = ("attention:moe",)
    with pytest.raises(ValueError, match=f"^{message}") as err:
        ModelSpec(cfg)
    assert "\n" not in str(err.value)


def test_registered_with_parameter_names_and_axes():
    assert CHANNEL_MIXERS["moe"] is MoE
    rules = default_rules()
    assert rules["experts"] == ("expert",) and rules["expert_mlp"] == ("tensor",)
    cfg = moe_cfg(router_bias=True, num_shared_experts=1, shared_expert_dim=24,
                  shared_expert_gate=True)
    cfg.update(pattern=("attention:moe",), num_layers=2)
    spec = ModelSpec(cfg)
    channel = spec.axis_names["units"]["blocks"][0]["channel"]
    shapes = jax.tree.map(lambda s: s.shape, spec.shapes["units"]["blocks"][0]["channel"])
    assert channel == {
        "router": ("layers", "embed", "experts_router"),
        "router_bias": ("layers", "experts_router"),
        "wi_gate": ("layers", "experts", "embed", "expert_mlp"),
        "wi_up": ("layers", "experts", "embed", "expert_mlp"),
        "wo": ("layers", "experts", "expert_mlp", "embed"),
        "shared": {"wi_gate": ("layers", "embed", "mlp"), "wi_up": ("layers", "embed", "mlp"),
                   "wo": ("layers", "mlp", "embed")},
        "shared_gate": ("layers", "embed", None),
    }
    assert shapes["wi_gate"] == (2, 8, D, 12) and shapes["wo"] == (2, 8, 12, D)
    assert shapes["router"] == (2, D, 8) and shapes["shared_gate"] == (2, D, 1)
    assert spec.shapes["units"]["blocks"][0]["channel"]["router_bias"].dtype == jnp.float32


def test_flops_count_active_parameters_only():
    cfg = moe_cfg(num_shared_experts=1, shared_expert_dim=24, shared_expert_gate=True)
    active = 2 * D * 8 + 2 * 6 * D * 12 + 6 * D * 24 + 2 * D
    assert MoE.flops_per_token(cfg, 128) == active
    mixtral, qwen = load_config("mixtral:8x7b").model, load_config("qwen_moe:30b_a3b").model
    # 2 FLOPs per active parameter (the embedding lookup aside): the published 12.9B and 3.3B.
    active = lambda cfg: forward_flops_per_token(cfg, 0) / 2 + cfg.vocab_size * cfg.d_model
    assert active(mixtral) == pytest.approx(12.9e9, rel=0.01)
    assert active(qwen) == pytest.approx(3.3e9, rel=0.02)


@pytest.mark.parametrize("impl", ["ragged", "dense"])
def test_flops_against_cost_analysis(impl):
    """The analytic count is the active FLOPs (router, k experts). XLA's cost analysis cannot
    see top-k sparsity: it counts ``ragged_dot`` as a dense matmul of all its rows (the N * k
    assignments) against every group (XLA:CPU lowers it to a masked dense dot; a v5e AOT
    compile counts it the same), i.e. E times the routed experts' active FLOPs, and the dense
    impl runs all E experts on the N tokens, E / k times. So the check is: cost = analytic +
    the routed part counted (E - 1) resp. (E / k - 1) more times, within 5%."""
    cfg = load_config("mixtral:tiny,model.dtype=float32,model.scan_layers=False").model
    cfg.update(d_model=256, num_heads=4, head_dim=64, num_layers=2)
    e, k, f = 4, 2, 512
    cfg.moe.update(num_experts=e, num_experts_per_tok=k, expert_dim=f, impl=impl)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))))
    b, t = 2, 64

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens).logits

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    cost = jax.jit(forward).lower(abstract, jax.ShapeDtypeStruct((b, t), jnp.int32)).compile()
    cost = cost.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    tokens = b * t
    analytic = forward_flops_per_token(cfg, t) * tokens
    routed = cfg.num_layers * tokens * k * 6 * cfg.d_model * f
    extra = (e - 1) if impl == "ragged" else (e / k - 1)
    assert cost["flops"] == pytest.approx(analytic + extra * routed, rel=0.05)
