"""Random-access image sources: `len(source)` examples, `source[i] -> {"image": uint8 [H, W, 3],
"label": int}`, class names in `source.classes`.

    shapes        the embedded set, drawn in code (`data/shapes.py`)
    image_folder  `path/<class>/*.{png,jpg,jpeg,bmp,gif,webp}`, classes = sorted sub-folder names;
                  files are listed on construction and decoded (Pillow, RGB) on access
    npz           arrays `images` uint8 [N, H, W, 3] (or grey [N, H, W] / [N, H, W, 1]),
                  `labels` int [N], optional `classes` (names); read into memory on construction
    array_record  one example per record (format below), read on access; `path` may be a glob
                  of shards, read in sorted order as one sequence

Splits of the file sources: with `data.eval_path`, train is all of `data.path` and eval all of
`data.eval_path`, which must have the train split's class names. Without it, eval is a held-out
5%: the examples whose key has a CRC32 divisible by 20 (the file path relative to the folder for
image_folder, so adding images moves no other image between splits; the example index for npz
and array_record), and train is the rest.

Record format of an array_record file (`write_array_record`): record 0 is a header,
`b"TIH1"` + UTF-8 JSON `{"classes": [names] or null, "num_classes": k}`; every other record is
one example, `b"TIE1"` + label (int32, little-endian) + the encoded image (PNG by default; any
format Pillow reads).
"""

from __future__ import annotations

import glob
import io
import json
import operator
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader
from PIL import Image

from tessera.data.files import array_record_writer
from tessera.data.shapes import SHAPE_CLASSES, ShapesSource
from tessera.data.sources import IMAGE_SOURCES, TEXT_SOURCES

Example = dict[str, Any]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
HOLDOUT_EVERY = 20
_SPLITS = ("train", "eval", "all")
_HEADER, _EXAMPLE = b"TIH1", b"TIE1"
_LABEL = struct.Struct("<i")
_READ_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # tuned for random access


class ImageSource(Protocol):
    """A finite, random-access sequence of labelled images."""

    classes: tuple[str, ...]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


def decode_image(data: str | bytes, where: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB pixels of an encoded image, given as a file path or its bytes; `where`
    names it in errors."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {where}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image {where}: {e}") from None


def to_rgb(image: np.ndarray, where: str) -> np.ndarray:
    """uint8 [H, W, 3] from uint8 [H, W, 3], [H, W, 1] or grey [H, W]."""
    if image.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(
            f"{where}: image shape {image.shape} is not [H, W], [H, W, 1] or [H, W, 3]"
        )
    return image if image.shape[-1] == 3 else np.repeat(image, 3, axis=-1)


def _split_index(count: int, split: str, key: Callable[[int], str] = str) -> np.ndarray:
    """int64 indices, among `count` examples, of those in `split`: a held-out 1 in HOLDOUT_EVERY
    by the CRC32 of `key(index)` (module docstring)."""
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(_SPLITS)}")
    if split == "all":
        return np.arange(count, dtype=np.int64)
    held_out = split == "eval"
    return np.array(
        [i for i in range(count) if (zlib.crc32(key(i).encode()) % HOLDOUT_EVERY == 0) == held_out],
        np.int64,
    )


def _check_classes(
    where: str, names: tuple[str, ...] | None, num_classes: int, expected: tuple[str, ...] | None
) -> tuple[str, ...]:
    """The class names of a source with labels in [0, num_classes): its own `names`, which must
    equal `expected` (the train split's) when given, else `expected`, else "0", "1", ..."""
    known = names if names is not None else expected
    if known is not None and num_classes > len(known):
        raise ValueError(f"{where}: label {num_classes - 1} out of range for {len(known)} classes")
    if names is not None and expected is not None and names != expected:
        missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
        diff = f"missing {missing}, extra {extra}" if missing or extra else "in another order"
        raise ValueError(f"{where}: class names differ from the train split's ({diff})")
    return known if known is not None else tuple(str(i) for i in range(num_classes))


class ImageFolderSource:
    """Images in `path/<class>/` (module docstring); `classes`, when given, are the names the
    folder must have (the train split's)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        split: str = "all",
        classes: Sequence[str] | None = None,
    ):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"image folder not found: {self.path}")
        names = sorted(e.name for e in os.scandir(self.path) if e.is_dir() and e.name[0] != ".")
        if not names:
            raise ValueError(f"image folder {self.path} has no class sub-folders (path/<class>/*)")
        self.classes = _check_classes(
            self.path, tuple(names), len(names), None if classes is None else tuple(classes)
        )
        keys, self._files, self._labels = [], [], []
        for label, name in enumerate(names):
            folder = os.path.join(self.path, name)
            files = sorted(
                e.name
                for e in os.scandir(folder)
                if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
            )
            if not files:
                exts = ", ".join(IMAGE_EXTENSIONS)
                raise ValueError(f"class folder {folder} has no images ({exts})")
            keys += [f"{name}/{file}" for file in files]
            self._files += [os.path.join(folder, file) for file in files]
            self._labels += [label] * len(files)
        self._index = _split_index(len(keys), split, keys.__getitem__)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> Example:
        i = self._index[operator.index(index)]
        return {"image": decode_image(self._files[i], self._files[i]), "label": self._labels[i]}


def _npz_array(npz: Any, key: str, path: str) -> np.ndarray:
    if key not in npz.files:
        raise ValueError(f"npz file {path} has no {key!r} array (has: {', '.join(npz.files)})")
    try:
        return npz[key]
    except ValueError as e:  # an object array (pickled), which is not read
        raise ValueError(f"npz file {path}: cannot read {key!r} ({e})") from None


class NpzSource:
    """Images and labels of one `.npz` file (module docstring), held in memory."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        split: str = "all",
        classes: Sequence[str] | None = None,
    ):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"npz file not found: {self.path}")
        try:
            npz = np.load(self.path)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read npz file {self.path}: {e}") from None
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError(f"{self.path} is a single .npy array, not an npz archive")
        with npz:
            images = _npz_array(npz, "images", self.path)
            labels = _npz_array(npz, "labels", self.path)
            names = None
            if "classes" in npz:
                names = tuple(map(str, _npz_array(npz, "classes", self.path)))
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
            raise ValueError(
                f"npz file {self.path}: images must be [N, H, W, 3], [N, H, W, 1] or [N, H, W], "
                f"got shape {images.shape}"
            )
        if images.dtype != np.uint8:
            raise ValueError(f"npz file {self.path}: images must be uint8, got {images.dtype}")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"npz file {self.path}: labels must be int [N], got {labels.dtype} {labels.shape}"
            )
        if len(labels) != len(images):
            raise ValueError(f"npz file {self.path}: {len(images)} images but {len(labels)} labels")
        if len(labels) and labels.min() < 0:
            raise ValueError(f"npz file {self.path}: negative label {labels.min()}")
        num_classes = int(labels.max()) + 1 if len(labels) else 0
        self.classes = _check_classes(
            self.path, names, num_classes, None if classes is None else tuple(classes)
        )
        self._images, self._labels = images, labels
        self._index = _split_index(len(labels), split)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> Example:
        i = self._index[operator.index(index)]
        return {"image": to_rgb(self._images[i], self.path), "label": int(self._labels[i])}


def _shard_paths(path: str) -> list[str]:
    """The files `path` names: itself, or the sorted matches of a glob pattern."""
    if glob.has_magic(path):
        paths = sorted(glob.glob(path))
        if not paths:
            raise FileNotFoundError(f"no array_record files match {path}")
        return paths
    if not os.path.isfile(path):
        raise FileNotFoundError(f"array_record file not found: {path}")
    return [path]


class ArrayRecordSource:
    """Examples of one array_record file or a glob of shards (module docstring), read per record."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        split: str = "all",
        classes: Sequence[str] | None = None,
    ):
        self.path = os.fspath(path)
        expected = None if classes is None else tuple(classes)
        self._files = _shard_paths(self.path)
        self._readers = []
        counts = []
        for file in self._files:
            reader = ArrayRecordReader(file, _READ_OPTIONS)
            if not reader.ok():
                raise ValueError(f"{file} is not a readable array_record file")
            header = reader.read([0])[0] if reader.num_records() else b""
            if not header.startswith(_HEADER):
                raise ValueError(f"{file}: record 0 is not a tessera image header ({_HEADER!r})")
            try:
                meta = json.loads(header[len(_HEADER) :])
                names = None if meta["classes"] is None else tuple(meta["classes"])
                num_classes = int(meta["num_classes"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{file}: bad header record ({e})") from None
            expected = _check_classes(file, names, num_classes, expected)
            self._readers.append(reader)
            counts.append(reader.num_records() - 1)
        self.classes = expected
        self._starts = np.cumsum([0, *counts[:-1]])
        self._index = _split_index(sum(counts), split)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> Example:
        i = int(self._index[operator.index(index)])
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        record = i - int(self._starts[shard]) + 1
        where = f"{self._files[shard]} record {record}"
        try:
            data = self._readers[shard].read([record])[0]
        except RuntimeError as e:
            raise ValueError(f"cannot read {where}: {e}") from None
        if not data.startswith(_EXAMPLE) or len(data) < len(_EXAMPLE) + _LABEL.size:
            raise ValueError(f"{where} is not a tessera image example ({_EXAMPLE!r})")
        (label,) = _LABEL.unpack_from(data, len(_EXAMPLE))
        if not 0 <= label < len(self.classes):
            raise ValueError(f"{where}: label {label} out of range for {len(self.classes)} classes")
        image = decode_image(data[len(_EXAMPLE) + _LABEL.size :], where)
        return {"image": image, "label": label}


def write_array_record(
    path: str | os.PathLike[str],
    images: Sequence[np.ndarray] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    classes: Sequence[str] | None = None,
    image_format: str = "png",
) -> None:
    """Writes images (uint8 [H, W, 3], [H, W, 1] or [H, W] each) and their labels as an
    array_record file in the format of the module docstring, encoding each image as
    `image_format` (Pillow's name: png, jpeg, webp, ...). Give `classes` (names, in label order)
    when writing shards one by one: shards without names take the first shard's class count. An
    existing file is an error; the file appears only once complete."""
    path = os.fspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"array_record file exists: {path}")  # before any other check
    labels = [operator.index(label) for label in labels]
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if labels and min(labels) < 0:
        raise ValueError(f"negative label {min(labels)}")
    num_classes = max(labels, default=-1) + 1
    names = None if classes is None else [str(c) for c in classes]
    _check_classes(path, None if names is None else tuple(names), num_classes, None)
    with array_record_writer(path) as writer:
        header = {"classes": names, "num_classes": num_classes if names is None else len(names)}
        writer.write(_HEADER + json.dumps(header).encode())
        for n, (image, label) in enumerate(zip(images, labels, strict=True)):
            encoded = io.BytesIO()
            rgb = to_rgb(np.asarray(image), f"image {n}")
            Image.fromarray(rgb).save(encoded, format=image_format)
            writer.write(_EXAMPLE + _LABEL.pack(label) + encoded.getvalue())


_FILE_SOURCES = {
    "image_folder": ImageFolderSource,
    "npz": NpzSource,
    "array_record": ArrayRecordSource,
}


def _source_name(data_cfg: Any) -> str:
    name = data_cfg.get("source", "")
    if name in TEXT_SOURCES:
        raise ValueError(
            f"data.source={name!r} is a text source (make_pipeline); "
            f"image sources: {', '.join(IMAGE_SOURCES)}"
        )
    if name not in IMAGE_SOURCES:
        raise ValueError(f"unknown image source {name!r}; known: {', '.join(IMAGE_SOURCES)}")
    return name


def _file_source(name: str, data_cfg: Any, split: str) -> ImageSource:
    """The split of a file source (module docstring: with or without data.eval_path)."""
    path, eval_path = data_cfg.get("path", ""), data_cfg.get("eval_path", "")
    if not path:
        raise ValueError(f"data.source={name!r} needs data.path")
    source = _FILE_SOURCES[name]
    if not eval_path:
        return source(path, split)
    if split == "train":
        return source(path, "all")
    return source(eval_path, "all", classes=source(path, "all").classes)


def make_image_source(data_cfg: Any, split: str, image_size: int) -> ImageSource:
    """The image source `data_cfg.source` for `split` ("train" or "eval"); the shapes set is
    drawn at `image_size` (with seed `data_cfg.seed`), files keep their own size."""
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; known: train, eval")
    name = _source_name(data_cfg)
    if name == "shapes":
        return ShapesSource(data_cfg.get("seed", 0), split, image_size)
    return _file_source(name, data_cfg, split)


def image_classes(data_cfg: Any) -> tuple[str, ...]:
    """Class names of the configured image source, in label order."""
    name = _source_name(data_cfg)
    return SHAPE_CLASSES if name == "shapes" else _file_source(name, data_cfg, "train").classes
