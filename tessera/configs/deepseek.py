"""DeepSeek-style LMs with multi-head latent attention (``mla``): ``tiny`` for CPU and the
attention shapes of the published models (``v2_lite``, ``v3``).

The published models put a mixture of experts in every layer after the first
(``first_k_dense_replace``: 1 for V2-Lite, 3 for V3). tessera's MoE channel mixer is not in yet,
so these presets use a dense MLP of each model's dense intermediate size in every layer; their
attention, embeddings, norms and RoPE are the published ones (``model.num_kv_heads`` and
``head_dim`` are unused by mla). RoPE is yarn with DeepSeek's mscale / mscale_all_dim
(``layers/positions.py``), over 163840 positions from 4096.
"""

from tessera.configs.base import ConfigDict, make_get_config


def _tiny(c: ConfigDict) -> None:
    """Two MLA layers of width 128 with a compressed query (V3-like); trains on CPU in seconds.
    The cache keeps 64 + 16 values per token and layer; the decompressed keys and values it
    stands for are 4 x (48 + 32) = 320."""
    c.model.update(family="deepseek", pattern=("mla:mlp",), num_layers=2, d_model=128,
                   num_heads=4, mlp_dim=384)
    c.model.mla.update(q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                       v_head_dim=32)


def _published(c: ConfigDict, **model) -> None:
    c.model.update(family="deepseek", pattern=("mla:mlp",), norm_eps=1e-6, rope_theta=10000.0,
                   max_seq_len=163840, tie_embeddings=False, remat="full", **model)
    c.model.rope_scaling.update(type="yarn", factor=40.0, original_max_position_embeddings=4096,
                                beta_fast=32.0, beta_slow=1.0)
    c.data.update(seq_len=4096, global_batch_size=256)
    c.optim.update(learning_rate=2.4e-4, warmup_steps=2000)
    c.mesh.update(data=1, fsdp=-1)


def _v2_lite(c: ConfigDict) -> None:
    """deepseek-ai/DeepSeek-V2-Lite: d_model 2048, 27 layers, 16 heads, no query compression,
    latent 512, nope 128 + rope 64, values 128; mscale = mscale_all_dim = 0.707."""
    _published(c, d_model=2048, num_layers=27, num_heads=16, mlp_dim=10944,
               vocab_size=102400)
    c.model.rope_scaling.update(mscale=0.707, mscale_all_dim=0.707)
    c.model.mla.update(q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
                       qk_rope_head_dim=64, v_head_dim=128)


def _v3(c: ConfigDict) -> None:
    """deepseek-ai/DeepSeek-V3: d_model 7168, 61 layers, 128 heads, query rank 1536, latent 512,
    nope 128 + rope 64, values 128; mscale = mscale_all_dim = 1.0."""
    _published(c, d_model=7168, num_layers=61, num_heads=128, mlp_dim=18432,
               vocab_size=129280)
    c.model.rope_scaling.update(mscale=1.0, mscale_all_dim=1.0)
    c.model.mla.update(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                       qk_rope_head_dim=64, v_head_dim=128)


get_config = make_get_config({"tiny": _tiny, "v2_lite": _v2_lite, "v3": _v3})
