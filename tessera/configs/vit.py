"""Vision Transformer (``model.name = "vit"``, task ``classify``): ``tiny`` trains on the embedded
shapes images on CPU; ``ti16`` ... ``h14`` are the published ViT shapes (Dosovitskiy et al. 2021,
Table 1; big_vision's ``vit.py``) for 224 x 224 ImageNet-1k.

Every preset is the original ViT: pre-norm LayerNorm blocks, bidirectional attention without
RoPE, exact-GELU MLP, biases everywhere (HF ``ViTForImageClassification``'s layout).
"""

from tessera.configs.base import ConfigDict, make_get_config


def _vit(c: ConfigDict, **model) -> None:
    """What every ViT preset shares, plus ``model``'s own fields."""
    c.model.update(
        name="vit",
        family="vit",
        pattern=("attention:mlp",),
        norm="layernorm",
        norm_eps=1e-6,
        mlp_activation="gelu",
        mlp_bias=True,
        qkv_bias=True,
        attn_out_bias=True,
        causal=False,
        rope=False,
        **{"pool": "cls", "pos_embedding": "learned", **model},
    )
    c.train.task = "classify"


def _tiny(c: ConfigDict) -> None:
    """32 x 32 images of 6 procedural shape classes (``data.source="shapes"``), 4 x 4 patches of
    8 px: 17 tokens, 4 layers of width 64 (0.15M parameters). Learned positions, no augmentation
    (the set already varies position, size, rotation and colour). 2000 steps of 64 images take
    about 3 minutes on 2 CPU cores; held-out accuracy over the whole eval split is in the README
    (Vision). Patches of 8 px learn about as much per step as patches of 4 px at a quarter of
    the tokens, so about 4x faster per image on CPU."""
    _vit(
        c,
        image_size=32,
        patch_size=8,
        d_model=64,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        mlp_dim=128,
        num_classes=6,
        pos_embedding="learned",
        dtype="float32",  # bf16 matmuls are slower than float32 on CPU
    )
    c.data.update(source="shapes", global_batch_size=64, augment=False)
    c.optim.update(learning_rate=2e-3, warmup_steps=100, weight_decay=0.05)
    c.train.update(steps=2000, log_every=50)
    c.eval.update(every=250, batches=16)  # 16 x 64 >= the 1,000 held-out images: all of them
    c.checkpoint.every = 500


def _published(
    c: ConfigDict,
    *,
    d_model: int,
    num_layers: int,
    num_heads: int,
    mlp_dim: int,
    patch_size: int = 16,
    remat: str = "none",
) -> None:
    """A published ViT shape for 224 x 224 ImageNet-1k (1000 classes), big_vision's i1k recipe
    (batch 1024, lr 1e-3, 10k warmup, about 90 epochs; optax weight decay = big_vision's 1e-4 /
    lr). ``data.path``: an image folder of the 1000 classes."""
    _vit(
        c,
        image_size=224,
        patch_size=patch_size,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=d_model // num_heads,
        mlp_dim=mlp_dim,
        num_classes=1000,
        remat=remat,
    )
    c.data.update(source="image_folder", global_batch_size=1024)
    c.optim.update(learning_rate=1e-3, warmup_steps=10_000, weight_decay=0.1, b2=0.999)
    c.train.steps = 112_600
    c.mesh.update(data=1, fsdp=-1)


def _ti16(c: ConfigDict) -> None:
    """ViT-Ti/16 (DeiT-Ti): 5.7M parameters."""
    _published(c, d_model=192, num_layers=12, num_heads=3, mlp_dim=768)


def _s16(c: ConfigDict) -> None:
    """ViT-S/16: 22M parameters."""
    _published(c, d_model=384, num_layers=12, num_heads=6, mlp_dim=1536)


def _b16(c: ConfigDict) -> None:
    """ViT-B/16: 86M parameters."""
    _published(c, d_model=768, num_layers=12, num_heads=12, mlp_dim=3072)


def _b32(c: ConfigDict) -> None:
    """ViT-B/32: 88M parameters."""
    _published(c, d_model=768, num_layers=12, num_heads=12, mlp_dim=3072, patch_size=32)


def _l16(c: ConfigDict) -> None:
    """ViT-L/16: 304M parameters."""
    _published(c, d_model=1024, num_layers=24, num_heads=16, mlp_dim=4096, remat="full")


def _h14(c: ConfigDict) -> None:
    """ViT-H/14: 632M parameters."""
    _published(
        c, d_model=1280, num_layers=32, num_heads=16, mlp_dim=5120, patch_size=14, remat="full"
    )


get_config = make_get_config(
    {"tiny": _tiny, "ti16": _ti16, "s16": _s16, "b16": _b16, "b32": _b32, "l16": _l16,
     "h14": _h14}
)
