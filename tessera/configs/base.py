"""Shared defaults for every config file; family files only state what differs.

A config file defines ``get_config(arg: str | None = None) -> ConfigDict`` where ``arg`` is a size
preset (``tiny``, ``small``, ``1b``, ...) optionally followed by ``key=value`` overrides, e.g.
``llama:tiny,train.steps=20``. The returned config is locked: assigning a key that does not exist
is an error, so a misspelt command-line override never silently does nothing.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

ConfigDict = ml_collections.ConfigDict


def balance_coef_from_hf(coef: float, k: int, num_layers: int) -> float:
    """``model.moe.aux_loss_coef`` for HF's ``router_aux_loss_coef`` (Mixtral, Qwen-MoE): HF's
    balance loss is ``num_experts_per_tok`` times tessera's per-layer one, averaged over the
    layers; tessera sums the layers' losses."""
    return coef * k / num_layers


def base_config() -> ConfigDict:
    """Every section with its defaults (a tiny Llama-shaped LM on the embedded corpus)."""
    c = ConfigDict()

    c.model = ConfigDict(
        dict(
            name="lm",
            family="llama",
            vocab_size=259,
            d_model=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            mlp_dim=384,
            max_seq_len=256,
            # Blocks before the scanned unit, unrepeated (DeepSeek: dense layers first); entries
            # as in pattern.
            prefix=(),
            # One block per entry, "mixer:channel [key=value ...]"; repeated
            # (num_layers - len(prefix)) / len(pattern) times. Per-block settings after the
            # block name, e.g. "attention:mlp sliding_window=4096 rope_theta=10000".
            pattern=("attention:mlp",),
            tie_embeddings=False,
            embed_norm=False,  # a norm right after the token embedding (RWKV's ln0)
            norm="rmsnorm",  # rmsnorm | layernorm (scale and bias): the blocks' and final norm
            norm_eps=1e-5,
            mlp_activation="swiglu",  # swiglu (gated) | gelu (exact erf) | gelu_tanh
            mlp_bias=False,  # biases on the MLP projections
            causal=True,  # False: bidirectional attention (ViT)
            rope=True,  # False: no rotary embedding (absolute position embeddings instead)
            qkv_bias=False,
            attn_out_bias=False,  # bias on the attention output projection
            qk_norm=False,
            sliding_window=0,  # 0: full causal attention
            logit_soft_cap=0.0,  # > 0: attention scores squashed to c * tanh(s / c) (Gemma 2)
            rope_theta=10000.0,
            rope_scaling=ConfigDict(
                dict(
                    type="none",
                    factor=1.0,
                    original_max_position_embeddings=0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    beta_fast=32.0,
                    beta_slow=1.0,
                    # yarn, DeepSeek's variant: cos/sin are scaled by
                    # m(mscale) / m(mscale_all_dim), m(s) = 0.1 * s * ln(factor) + 1, when both
                    # are set (0: unset, HF's 0.1 * ln(factor) + 1); mla also multiplies its
                    # softmax scale by m(mscale_all_dim) ** 2.
                    mscale=0.0,
                    mscale_all_dim=0.0,
                )
            ),
            num_classes=0,  # classifier models: number of classes
            class_names=(),  # their names by index, if known (HF id2label); () = unnamed
            # Training-time regularisation of the blocks, active only in models called with
            # train=True and an rng (ViT): dropout on the embeddings and on each mixer's output
            # before its residual; stochastic depth (drop path) per example, its rate rising
            # linearly over depth from 0 at the first layer to this at the last.
            dropout=0.0,
            stochastic_depth=0.0,
            # Vision (vit): images [B, image_size, image_size, num_channels] cut into
            # patch_size x patch_size patches; pool: cls (class token) | map (attention
            # pooling) | gap (mean of the patches); pos_embedding: learned | sincos2d (fixed).
            image_size=224,
            patch_size=16,
            num_channels=3,
            pool="cls",
            pos_embedding="learned",
            head_zeroinit=True,  # classification head kernel starts at zero (big_vision)
            init_std=0.02,
            dtype="bfloat16",
            param_dtype="float32",
            remat="none",  # none | minimal | save_dots | full
            scan_layers=True,
            attention_impl="auto",
            # Dense products (attention projections, MLP, untied LM head): auto runs the CPU
            # kernel in float32 decode steps (tessera/kernels/dense), xla never; cpu names the
            # kernel for every call (an error where it cannot run: prefill, training).
            dense_impl="auto",
            # State-space mixers (mamba, mamba2); ignored by attention-only patterns.
            ssm=ConfigDict(
                dict(
                    state_dim=16,  # N: SSM state size per channel (mamba) / per head (mamba2)
                    conv_width=4,  # causal depthwise conv kernel size
                    expand=2,  # d_inner = expand * d_model
                    dt_rank=0,  # mamba: rank of the dt projection; 0 = ceil(d_model / 16)
                    head_dim=64,  # mamba2: channels per head (num_heads = d_inner / head_dim)
                    num_groups=1,  # mamba2: B/C groups shared by heads
                    chunk_size=64,  # chunked scan / SSD chunk length
                    dt_min=0.001,
                    dt_max=0.1,
                    dt_init_floor=1e-4,
                    dt_limit_min=0.0,  # mamba2: clamp of softplus(dt)
                    dt_limit_max=float("inf"),
                    conv_bias=True,
                    bias=False,  # in/out projection biases
                    impl="auto",  # auto | pallas_tpu | pallas_gpu | chunked ... (ssd / scan ops)
                )
            ),
            # RWKV-6 "Finch" time mix (rwkv6) and its channel mix (rwkv6_cmix, width mlp_dim).
            rwkv6=ConfigDict(
                dict(
                    head_dim=64,  # value channels per head: num_heads = value_dim / head_dim
                    expand_k=1.0,  # key_dim = expand_k * d_model (fla's default is 0.5)
                    expand_v=1.0,  # value_dim = expand_v * d_model
                    proj_low_rank_dim=32,  # rank of the token-shift mix LoRA (x 5: r w k v g)
                    gate_low_rank_dim=64,  # rank of the data-dependent decay LoRA
                    group_norm_eps=1e-5,  # per-head GroupNorm of the WKV output (fla norm_eps)
                    chunk_size=16,  # chunked WKV: tokens per chunk (kernels/gla)
                    impl="auto",  # auto | pallas_tpu | pallas_gpu | chunked | ... (kernels/gla)
                )
            ),
            # RetNet multi-scale retention (retention); heads = num_heads, rotary with
            # rope_theta on q and k, gated per-head RMSNorm with norm_eps.
            retention=ConfigDict(
                dict(
                    expand_k=1.0,  # query/key width = expand_k * d_model
                    expand_v=2.0,  # value/gate width = expand_v * d_model
                    chunk_size=64,  # chunked form's chunk length
                    impl="auto",  # auto | pallas_tpu | pallas_gpu | chunked | ... (kernels/gla)
                )
            ),
            # RWKV-7 time mix (rwkv7); heads of model.head_dim channels (H = d_model / head_dim).
            # LoRA ranks: 0 takes the official suggestion for the width (layers/mixers/rwkv7.py).
            rwkv7=ConfigDict(
                dict(
                    decay_low_rank_dim=0,
                    a_low_rank_dim=0,
                    v_low_rank_dim=0,
                    gate_low_rank_dim=0,
                    chunk_size=16,  # chunked delta rule: tokens per chunk
                    impl="auto",  # kernels/delta_rule: auto | pallas_tpu | pallas_gpu | chunked ...
                )
            ),
            # Multi-head latent attention (mla, DeepSeek-V2/V3); heads = num_heads. Queries
            # are nope | rope per head; keys and values come from one shared latent.
            mla=ConfigDict(
                dict(
                    q_lora_rank=0,  # rank of the query compression; 0: a full query projection
                    kv_lora_rank=64,  # latent width (what the cache keeps per token)
                    qk_nope_head_dim=32,  # per-head query/key width without RoPE
                    qk_rope_head_dim=16,  # per-head query width with RoPE; one shared rope key
                    v_head_dim=32,
                    rope_interleave=False,  # rope features as interleaved pairs (HF DeepSeek)
                    norm_eps=1e-6,  # eps of the q / kv latent RMSNorms (HF: always 1e-6)
                )
            ),
            # Mixture-of-experts channel mixer (pattern entries "...:moe", layers/moe.py).
            moe=ConfigDict(
                dict(
                    num_experts=8,
                    num_experts_per_tok=2,  # top-k
                    expert_dim=256,  # hidden width of each (SwiGLU) expert
                    num_shared_experts=0,  # 0: none; > 0: a shared MLP of shared_expert_dim
                    shared_expert_dim=0,  # width of the shared MLP (all shared experts together)
                    shared_expert_gate=False,  # Qwen2-MoE: sigmoid(x @ shared_gate) scales it
                    score_func="softmax",  # softmax | sigmoid (DeepSeek-V3)
                    norm_topk_prob=True,  # renormalise the k selected weights to sum 1
                    routed_scaling_factor=1.0,  # multiplies the routed experts' weights
                    # Group-limited routing (DeepSeek): experts in n_group groups, only the
                    # topk_group best groups eligible; group score "max" (V2) or "top2_sum" (V3).
                    n_group=1,
                    topk_group=1,
                    group_score="max",
                    # A per-expert bias added to the scores for the top-k choice only
                    # (DeepSeek-V3's e_score_correction_bias); implied by bias_update_rate > 0.
                    router_bias=False,
                    # After each train step bias_i += rate * sign(mean load - load_i).
                    bias_update_rate=0.0,
                    # Load-balancing loss E * sum_i f_i P_i (f: share of assignments, P: mean
                    # router probability; 1 when balanced) per layer; HF's Mixtral loss is
                    # num_experts_per_tok times this, averaged over layers.
                    aux_loss_coef=0.01,
                    z_loss_coef=0.0,  # router z-loss mean(logsumexp(logits)^2) per layer
                    # 0: dropless; > 0: an expert takes at most
                    # ceil(capacity_factor * T * k / E) assignments of a row of T tokens.
                    capacity_factor=0.0,
                    impl="auto",  # auto | megablox (TPU) | ragged | dense (kernels/moe)
                )
            ),
            # Diffusion models (model.name vae | unet | dit; tasks vae / diffusion). Images and
            # latents are [B, H, W, C]; the denoisers take model.image_size x model.image_size x
            # model.num_channels inputs (latents of the frozen VAE, or pixels without one) and
            # model.num_classes class labels (index num_classes: the null class of classifier-free
            # guidance).
            vae=ConfigDict(
                dict(
                    # KL autoencoder (Stable Diffusion's AutoencoderKL): one resolution level per
                    # entry, a 2x downsampling between levels (f = 2 ** (levels - 1)).
                    block_out_channels=(128, 256, 512, 512),
                    layers_per_block=2,
                    latent_channels=4,
                    norm_groups=32,
                    norm_eps=1e-6,
                    mid_attention=True,  # self-attention in the middle blocks
                    scaling_factor=0.18215,  # latents fed to the denoiser: (z - shift) * scale
                    shift_factor=0.0,
                    kl_weight=1e-6,  # task vae: loss = reconstruction + kl_weight * KL
                    reconstruction_loss="l1",  # task vae: l1 | mse, per pixel
                )
            ),
            unet=ConfigDict(
                dict(
                    # Stable Diffusion's UNet2DConditionModel: one level per entry, cross-attention
                    # transformer blocks where attention_levels says so.
                    block_out_channels=(320, 640, 1280, 1280),
                    attention_levels=(True, True, True, False),
                    layers_per_block=2,
                    num_attention_heads=(5, 10, 20, 20),  # per level (SD 2.1: head_dim 64)
                    transformer_layers=1,
                    cross_attention_dim=1024,  # width of the conditioning sequence
                    use_linear_projection=True,  # proj_in / proj_out as dense (SD 2) or 1x1 conv
                    norm_groups=32,
                    norm_eps=1e-5,
                    flip_sin_to_cos=True,
                    freq_shift=0,
                )
            ),
            dit=ConfigDict(
                dict(
                    # DiT on latent patches of model.patch_size, width d_model, num_layers blocks of
                    # num_heads x head_dim attention and an mlp_dim MLP, adaLN-Zero conditioning.
                    learn_sigma=False,  # output 2 x num_channels (DiT-XL/2's learned variance)
                    freq_dim=256,  # sinusoidal timestep features before the timestep MLP
                )
            ),
            diffusion=ConfigDict(
                dict(
                    schedule="scaled_linear",  # linear | scaled_linear | cosine
                    num_train_timesteps=1000,
                    beta_start=0.00085,
                    beta_end=0.012,
                    prediction="epsilon",  # epsilon | v_prediction | sample (x0)
                    # Sampler options as diffusers' scheduler configs name them (defaults: its
                    # class defaults; Stable Diffusion's: steps_offset=1, set_alpha_to_one=False):
                    # clip predicted x0 to [-1, 1] (ddpm, ddim), added to the "leading" timesteps
                    # (ddpm, ddim), DDIM's last step to alpha_cumprod 1 (True) or alphas_cumprod[0].
                    clip_sample=False,
                    steps_offset=0,
                    set_alpha_to_one=True,
                    # Task diffusion: the workdir of a trained VAE (task vae) whose latents the
                    # denoiser learns, frozen; "": the denoiser works on pixels.
                    vae_workdir="",
                    cond_dropout=0.1,  # labels replaced by the null class (for guidance)
                )
            ),
        )
    )

    c.mesh = ConfigDict(
        dict(
            # ICI (within a slice) sizes; one -1 takes the remaining devices.
            data=-1,
            fsdp=1,
            expert=1,
            sequence=1,
            tensor=1,
            # DCN (across slices) sizes; their product is the number of slices. By default the
            # data axis spans the slices: only gradients cross the slower DCN, once per step.
            dcn_data=-1,
            dcn_fsdp=1,
            dcn_expert=1,
            dcn_sequence=1,
            dcn_tensor=1,
            # Logical-axis rule overrides, "logical=axis+axis;logical=" (empty: replicate).
            rules="",
            # A parameter dimension that a rule's mesh axes do not divide is replicated over them
            # with a warning naming it; strict=True makes that an error.
            strict=False,
        )
    )

    c.data = ConfigDict(
        dict(
            # synthetic (the embedded corpus) | text (files: data.path, globs or a comma list of
            # .txt/.jsonl/.parquet/.array_record) | mixture (data.mixture) | seqio (data.task);
            # image sources for image tasks (data/images.py).
            source="synthetic",
            path="",
            eval_path="",
            text_field="text",
            # "SOURCE[:PATH]=WEIGHT;...", e.g. "text:/data/web/*.jsonl=3;synthetic=1"
            mixture="",
            # seqio (data/seqio_source.py): a registered Task or Mixture name; the module that
            # registers it (dotted name or path to a .py file), imported first; the seqio splits
            # tessera's train / eval read; seqio's sequence_length, "inputs=512,targets=128"
            # ("": none, seqio truncates nothing, the packer cuts long documents). Set
            # data.tokenizer=seqio (the task's targets vocabulary).
            task="",
            registry_module="",
            train_split="train",
            eval_split="validation",
            feature_lengths="",
            tokenizer="byte",
            synthetic_tasks="",
            seed=0,
            seq_len=128,
            global_batch_size=16,
            # The global batch is drawn from this many independent streams (each its own share of
            # the documents and its own packer); 0: one per row. Processes split the streams, so
            # the batch does not depend on the number of processes.
            streams=0,
            # greedy: documents in order, one that does not fit starts the next row; first_fit:
            # first-fit decreasing over windows of documents that fill pack_window rows (denser).
            packing="greedy",
            pack_window=32,
            # Image sources (shapes | image_folder | npz | array_record, data/images.py): train-time
            # augmentation, a random crop (reflect-pad by crop_padding pixels, crop back) and a
            # left-right flip; eval never augments.
            augment=True,
            crop_padding=4,
        )
    )

    c.optim = ConfigDict(
        dict(
            name="adamw",
            learning_rate=3e-3,
            warmup_steps=20,
            schedule="cosine",  # cosine | linear | constant
            end_lr_factor=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            clip_norm=1.0,
            grad_accum_steps=1,
        )
    )

    c.train = ConfigDict(
        dict(
            task="lm",
            steps=1200,
            log_every=10,
            seed=0,
            z_loss=0.0,
            label_smoothing=0.0,  # classify: weight of the uniform target mixed into the one-hot
            # lm: the vocabulary projection and loss run over chunks of this many positions,
            # recomputed in the backward, so [batch, seq, vocab] float32 logits never exist at
            # once (8 GB per device for Llama-3's vocabulary at batch 4 x 4096); 0: in one go.
            loss_chunk=1024,
            nan_policy="stop",  # stop | skip
            progress=True,
            tensorboard=True,
            ema_decay=0.0,  # > 0: keep an exponential moving average of the parameters
        )
    )

    c.eval = ConfigDict(
        dict(
            every=100,  # run the task's evaluation every N steps and at the end; 0: never
            batches=4,  # batches per evaluation (fewer if the eval split ends first)
            source="",  # "": the held-out split of data.source (data.eval_path for files)
            # data.source=seqio: the task's metric functions run on this many examples of its
            # eval split (predictions by greedy decoding, scores = target log-likelihood), logged
            # as eval/seqio/<metric>; 0: off.
            seqio_examples=32,
        )
    )

    c.checkpoint = ConfigDict(
        dict(
            every=100,
            keep=3,
            async_save=True,  # orbax writes in the background while training goes on
            # Where checkpoints go: "" is WORKDIR/checkpoints; a local path or gs://bucket/path
            # (on a pod: storage every host reaches).
            directory="",
        )
    )

    c.decode = ConfigDict(
        dict(
            max_new_tokens=32,
            batch_size=16,  # prompts per batch (decode CLI default; tessera.aot --decode)
            prompt_len=128,  # prompt tokens tessera.aot --decode compiles for
            temperature=0.0,
            top_k=0,
            top_p=1.0,
            min_p=0.0,
            seed=0,
            # Diffusion sampling (python -m tessera.serve.sample): sampler ddpm | ddim |
            # dpmpp_2m | euler, denoising steps, classifier-free guidance scale (1: none), DDIM's
            # eta, images per run, class label (-1: classes in turn).
            sampler="ddim",
            steps=20,
            guidance=1.0,
            eta=0.0,
            num_images=16,
            class_label=-1,
        )
    )
    return c


_TRUE, _FALSE = ("true", "t", "1"), ("false", "f", "0")  # absl's BooleanParser spellings


def split_config_arg(arg: str | None) -> tuple[list[str], dict[str, str]]:
    """``"tiny,train.steps=5,model.pattern=('a', 'b')"`` -> ``(["tiny"], {key: text})``.

    Items are split on commas outside brackets and quotes, so tuple values keep theirs.
    """
    items, depth, quote, start = [], 0, "", 0
    text = arg or ""
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    names, overrides = [], {}
    for item in filter(None, (s.strip() for s in items)):
        key, sep, value = item.partition("=")
        if sep:
            overrides[key.strip()] = value.strip()
        else:
            names.append(item)
    return names, overrides


def lookup(config: ConfigDict, dotted: str) -> Any:
    """The value (or section) at ``dotted``; an unknown key raises ``KeyError`` naming it."""
    node, parts = config, dotted.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "config"
        if not isinstance(node, ConfigDict):
            raise KeyError(f"unknown config key {dotted!r}: {where} is a value, not a section")
        if part not in node:
            known = ", ".join(sorted(node.keys()))
            raise KeyError(f"unknown config key {dotted!r}: {where} has no {part!r} (has {known})")
        node = node[part]
    return node


def parse_override(config: ConfigDict, dotted: str, value: Any) -> Any:
    """The value of ``dotted`` given as ``value``: text is coerced to the field's type (int,
    float, bool, str, tuple); other values must have it. Unknown key: ``KeyError``; a value of
    the wrong type: ``ValueError``, e.g. ``model.d_model: 'abc' is not an int``."""
    node = lookup(config, dotted)
    if isinstance(node, ConfigDict):
        example = f"{dotted}.{next(iter(node))}"
        raise ValueError(f"{dotted} is a section, not a value; set its fields ({example}=...)")
    kind = type(node)
    try:
        if isinstance(value, str):
            return _from_text(kind, value)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind is tuple and isinstance(value, list):
            return tuple(value)
        if type(value) is kind:
            return value
    except ValueError:
        pass
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    raise ValueError(f"{dotted}: {value!r} is not {article} {kind.__name__}")


def _from_text(kind: type, text: str) -> Any:
    if kind is str:
        return text
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(text)
    if kind in (int, float):
        return kind(text.strip())
    if kind is tuple:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return (text,)  # one unquoted string, e.g. "attention:mlp sliding_window=4096"
        return tuple(value) if isinstance(value, list | tuple) else (value,)
    raise ValueError(text)


def format_override(value: Any) -> str:
    """Text that absl's ``config_flags`` parses back to ``value`` (a ``parse_override`` result)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return repr(value)


def flat_items(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: a nested config (as a dict) by dotted key."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flat_items(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def apply_overrides(config: ConfigDict, overrides: Mapping[str, Any]) -> None:
    """Set dotted ``key=value`` overrides, parsed by ``parse_override`` (errors name the key)."""
    for dotted, value in overrides.items():
        parsed = parse_override(config, dotted, value)
        parent, _, last = dotted.rpartition(".")
        (lookup(config, parent) if parent else config)[last] = parsed


def make_get_config(
    presets: Mapping[str, Callable[[ConfigDict], None]], default: str = "tiny"
) -> Callable[[str | None], ConfigDict]:
    """Build a family's ``get_config`` from named presets that edit the base config in place.

    ``arg`` is ``"preset"`` or ``"preset,key=value,..."`` or ``"key=value,..."`` (default preset).
    """

    def get_config(arg: str | None = None) -> ConfigDict:
        names, overrides = split_config_arg(arg)
        if len(names) > 1:
            raise ValueError(f"more than one preset in {arg!r}: {', '.join(names)}")
        preset = names[0] if names else default
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(presets)}")
        config = base_config()
        presets[preset](config)
        config.lock()
        apply_overrides(config, overrides)
        return config

    get_config.presets = tuple(presets)  # type: ignore[attr-defined]
    return get_config
