"""Image classification batches: source -> shard per process -> shuffle/repeat -> resize ->
augment (train) -> normalise -> batch, resumable.

Batch layout (B = global_batch_size // process_count, S = image_size):

    images  float32 [B, S, S, 3]  RGB scaled to [-1, 1] by x / 127.5 - 1 (HF ViT's mean = std =
                                  0.5 normalisation); zeros on the rows that pad an eval split's
                                  last batch
    label   int32   [B]           index into `image_classes(data_cfg)`; -1 on padding rows

Images are resized to S x S with Pillow's bilinear filter (antialiased when shrinking; the aspect
ratio is not kept, as in HF ViT's processor); the shapes set is drawn at S. Train-time
augmentation (`data.augment`): reflect-pad by `data.crop_padding` pixels and crop S x S at a
random offset, then flip left-right with probability 1/2. The draws come from an RNG keyed by
(seed, process_index, position in the shuffled, repeated stream), so each epoch draws anew and a
resumed iterator yields exactly the batches the first one would have. Eval never augments.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import grain
import numpy as np
from PIL import Image

from tessera.data.classify import PAD_LABEL
from tessera.data.images import decode_image, make_image_source
from tessera.data.pipeline import Batch, DataIterator, batch_rows, shard_source


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3], bilinear (as is when already that size)."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def normalise(image: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 in [-1, 1]: x / 127.5 - 1."""
    return image.astype(np.float32) / np.float32(127.5) - np.float32(1)


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Indices into [0, size) of positions up to size - 1 beyond either edge, mirrored about the
    edge pixel (numpy's "reflect" padding)."""
    return size - 1 - np.abs(size - 1 - np.abs(index))


def augment(image: np.ndarray, rng: np.random.Generator, padding: int) -> np.ndarray:
    """Random crop (of the input reflect-padded by `padding`, back to the input size) and
    left-right flip of uint8 [H, W, 3], gathered in one indexing op."""
    h, w = image.shape[:2]
    u_dy, u_dx, u_flip = rng.random(3).tolist()
    dy, dx = (int(u * (2 * padding + 1)) - padding for u in (u_dy, u_dx))
    rows, cols = _reflect(np.arange(h) + dy, h), _reflect(np.arange(w) + dx, w)
    return image.take(rows, axis=0).take(cols[::-1] if u_flip < 0.5 else cols, axis=1)


def load_image(path: str | os.PathLike[str], image_size: int) -> np.ndarray:
    """One image file decoded, resized and normalised as the eval pipeline does: float32
    [image_size, image_size, 3] in [-1, 1]."""
    path = os.fspath(path)
    return normalise(resize(decode_image(path, path), image_size))


def _example(
    index: int,
    example: dict[str, Any],
    *,
    image_size: int,
    augment_key: tuple[int, int] | None,
    padding: int,
) -> Batch:
    image = resize(example["image"], image_size)
    if augment_key is not None:
        image = augment(image, np.random.default_rng([*augment_key, index]), padding)
    return {"images": normalise(image), "label": np.int32(example["label"])}


def make_image_pipeline(
    data_cfg: Any,
    *,
    global_batch_size: int,
    image_size: int,
    split: str = "train",
    process_index: int = 0,
    process_count: int = 1,
    seed: int = 0,
    num_classes: int | None = None,
) -> DataIterator:
    """This process's batches of labelled images (module docstring) for `split`.

    Each process reads the disjoint shard `source[process_index::process_count]` of
    `data_cfg.source` (`data/images.py`) and yields `global_batch_size // process_count` rows a
    batch. Train shuffles with `seed` (reshuffled every epoch), repeats forever and augments when
    `data_cfg.augment`; eval reads its shard once in order and pads the last batch. With
    `num_classes` (the model's), a source with more classes than that is an error.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    augmenting = split == "train" and bool(data_cfg.get("augment", True))
    padding = int(data_cfg.get("crop_padding", 4)) if augmenting else 0
    if not 0 <= padding < image_size:
        raise ValueError(f"data.crop_padding {padding} not in [0, image_size={image_size})")
    source = make_image_source(data_cfg, split, image_size)
    names = tuple(source.classes)
    if num_classes is not None and len(names) > num_classes:
        raise ValueError(
            f"model.num_classes={num_classes} is fewer than the {len(names)} classes of "
            f"data.source={data_cfg.source!r} ({', '.join(names[:8])}"
            f"{', ...' if len(names) > 8 else ''})"
        )
    shard = shard_source(
        source,
        split=split,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
        image_size=image_size,
        augment=augmenting,
        crop_padding=padding,
    )
    example = functools.partial(
        _example,
        image_size=image_size,
        augment_key=(seed, process_index) if augmenting else None,
        padding=padding,
    )
    rows = shard.docs.map_with_index(example)
    return batch_rows(
        rows.to_iter_dataset(grain.ReadOptions(num_threads=0)), shard, {"label": PAD_LABEL}
    )
