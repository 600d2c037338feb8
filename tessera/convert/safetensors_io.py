"""Read and write Hugging Face safetensors checkpoints one tensor at a time.

A model directory holds ``model.safetensors`` or ``model.safetensors.index.json`` plus the shards
its ``weight_map`` names (diffusers models: the same with the stem ``diffusion_pytorch_model``).
Reading maps a file and returns a view of one tensor, so converting a model never holds more
than the tensor at hand (plus what the caller keeps). The header is parsed here rather than
through ``safetensors.safe_open`` because numpy has no bfloat16 / float8: those come back as
``ml_dtypes`` arrays. Writing goes through ``safetensors.numpy``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from tessera.convert.errors import ConversionError

STEM = "model"  # transformers' file names; diffusers' are DIFFUSERS_STEM.*
DIFFUSERS_STEM = "diffusion_pytorch_model"
SINGLE_FILE = f"{STEM}.safetensors"
INDEX_FILE = f"{STEM}.safetensors.index.json"

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


def _read_header(path: str) -> tuple[dict, int]:
    """(tensor entries, byte offset of the data section) of one safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > os.path.getsize(path) - 8:
            raise ConversionError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path} is not a safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + size


_SUFFIXES = (".safetensors", ".safetensors.index.json")


class SafetensorsReader:
    """The tensors of a HF model directory: ``names``, ``shape(name)``, ``get(name)``."""

    def __init__(self, directory: str):
        self.directory = directory
        stem = next(
            (s for s in (STEM, DIFFUSERS_STEM)
             if any(os.path.isfile(os.path.join(directory, f"{s}{e}")) for e in _SUFFIXES)),
            STEM,
        )
        index = os.path.join(directory, f"{stem}.safetensors.index.json")
        single = f"{stem}.safetensors"
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index} has no weight_map")
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(directory, single)):
            weight_map, files = None, [single]
        else:
            raise ConversionError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {directory} (only safetensors checkpoints "
                "are read; convert .bin checkpoints with transformers first)"
            )
        self._entries: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise ConversionError(f"missing shard {name} (listed in {index}) in {directory}")
            header, data_start = _read_header(path)
            for tensor, entry in header.items():
                self._entries[tensor] = (path, entry, data_start)
        if weight_map is not None:
            for tensor, name in weight_map.items():
                if tensor not in self._entries:
                    raise ConversionError(
                        f"tensor {tensor} is listed in {INDEX_FILE} for shard {name}, "
                        "which does not contain it"
                    )

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[1]["shape"])

    def _entry(self, name: str) -> tuple[str, dict, int]:
        if name not in self._entries:
            raise ConversionError(f"missing tensor {name} in the checkpoint in {self.directory}")
        return self._entries[name]

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only array mapped from its file (bf16 via ml_dtypes)."""
        path, entry, data_start = self._entry(name)
        if entry["dtype"] not in DTYPES:
            raise ConversionError(
                f"tensor {name} has dtype {entry['dtype']}, which is not supported "
                f"(supported: {', '.join(DTYPES)})"
            )
        dtype = DTYPES[entry["dtype"]].newbyteorder("<")
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dtype.itemsize:
            raise ConversionError(
                f"tensor {name} in {path}: {end - begin} bytes for shape {shape} {entry['dtype']}"
            )
        if count == 0:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def _shard_groups(
    tensors: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int
) -> Iterator[dict[str, np.ndarray]]:
    group: dict[str, np.ndarray] = {}
    size = 0
    for name, array in tensors:
        if group and size + array.nbytes > max_shard_bytes:
            yield group
            group, size = {}, 0
        group[name] = np.ascontiguousarray(array)
        size += array.nbytes
    if group:
        yield group


def write_safetensors(
    directory: str,
    tensors: Iterable[tuple[str, np.ndarray]],
    max_shard_bytes: int,
    stem: str = STEM,
) -> list[str]:
    """Write ``(name, array)`` pairs as shards of at most ``max_shard_bytes`` (a single tensor
    may exceed it); more than one shard also writes the index. Returns the file names written.

    Shards are written as they fill, so only one shard's tensors are held at a time. They are
    named ``{stem}-XXXXX-of-YYYYY.safetensors`` once the count is known (renamed at the end).
    """
    os.makedirs(directory, exist_ok=True)
    written: list[tuple[str, list[str], int]] = []
    for i, group in enumerate(_shard_groups(tensors, max_shard_bytes)):
        tmp = os.path.join(directory, f".shard-{i:05d}.tmp")
        save_file(group, tmp, metadata={"format": "pt"})
        written.append((tmp, list(group), sum(a.nbytes for a in group.values())))
    if len(written) == 1:
        os.replace(written[0][0], os.path.join(directory, f"{stem}.safetensors"))
        return [f"{stem}.safetensors"]
    names, weight_map = [], {}
    for i, (tmp, tensor_names, _) in enumerate(written):
        name = f"{stem}-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(tmp, os.path.join(directory, name))
        names.append(name)
        weight_map.update(dict.fromkeys(tensor_names, name))
    index = {"metadata": {"total_size": sum(w[2] for w in written)}, "weight_map": weight_map}
    index_file = f"{stem}.safetensors.index.json"
    with open(os.path.join(directory, index_file), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return [*names, index_file]
