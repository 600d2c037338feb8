"""Read and write Hugging Face safetensors checkpoints one tensor at a time.

A model directory holds ``model.safetensors`` or ``model.safetensors.index.json`` plus the shards
its ``weight_map`` names (diffusers models: the same with the stem ``diffusion_pytorch_model``).
Reading maps a file and returns a view of one tensor (``get``), or copies one block of it
(``read``), so converting a model never holds more than the tensor at hand (plus what the caller
keeps). The header is parsed here rather than through ``safetensors.safe_open`` because numpy has
no bfloat16 / float8: those come back as ``ml_dtypes`` arrays. Writing goes through
``safetensors.numpy``: ``plan_shards`` decides which file holds which tensor (and which process
writes it) from the tensors' sizes alone, so several processes can each write their own files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections import Counter
from collections.abc import Iterable, Sequence

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
    """The tensors of a HF model directory: ``names``, ``shape(name)``, ``get(name)``,
    ``read(name, index)``; ``bytes_read`` counts the bytes ``read`` copied, per tensor."""

    def __init__(self, directory: str):
        self.directory = directory
        self.bytes_read: Counter[str] = Counter()
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

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """The block ``index`` of tensor ``name``, copied from its file into memory."""
        block = np.array(self.get(name)[index])
        self.bytes_read[name] += block.nbytes
        return block


@dataclasses.dataclass(frozen=True)
class ShardFile:
    """One safetensors file of a checkpoint: its name, the process that writes it, its tensors
    (in the order they come) and their bytes."""

    name: str
    process: int
    tensors: tuple[str, ...]
    nbytes: int


def plan_shards(
    sizes: Sequence[tuple[str, int]],
    max_shard_bytes: int,
    *,
    processes: int = 1,
    stem: str = STEM,
) -> list[ShardFile]:
    """The files of ``(name, bytes)`` tensors (in that order) written by ``processes``.

    The tensors are cut into ``processes`` consecutive runs of about equal bytes (a tensor goes
    to the run its middle byte falls in), and each run into files of at most
    ``max_shard_bytes`` (a single tensor may exceed it), filled in order. One file is
    ``{stem}.safetensors``; more are ``{stem}-XXXXX-of-YYYYY.safetensors``, numbered in order,
    and need the index (``write_index``).
    """
    total = sum(n for _, n in sizes)
    groups: list[list] = []  # [process, names, bytes]
    before = 0
    for name, nbytes in sizes:
        process = min(processes - 1, processes * (2 * before + nbytes) // (2 * total or 1))
        before += nbytes
        if not groups or groups[-1][0] != process or groups[-1][2] + nbytes > max_shard_bytes:
            groups.append([process, [], 0])
        groups[-1][1].append(name)
        groups[-1][2] += nbytes
    if len(groups) == 1:
        names = [f"{stem}.safetensors"]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    return [ShardFile(n, p, tuple(t), b) for n, (p, t, b) in zip(names, groups)]


def index_file(stem: str = STEM) -> str:
    return f"{stem}.safetensors.index.json"


def shard_names(files: Sequence[ShardFile], stem: str = STEM) -> list[str]:
    """The names of ``files`` and of the index when there is more than one file."""
    return [f.name for f in files] + ([index_file(stem)] if len(files) > 1 else [])


def write_shards(
    directory: str, tensors: Iterable[tuple[str, np.ndarray]], files: Sequence[ShardFile]
) -> None:
    """Write ``files`` (of ``plan_shards``) from ``tensors``, which must be exactly their
    tensors in order; each file is written once its tensors have come, so only one file's
    tensors are held at a time."""
    pending = iter(files)
    file, group = next(pending, None), {}
    for name, array in tensors:
        if file is None or name != file.tensors[len(group)]:
            raise ValueError(f"tensor {name} comes where the plan of the files has none")
        group[name] = np.ascontiguousarray(array)
        if len(group) == len(file.tensors):
            save_file(group, os.path.join(directory, file.name), metadata={"format": "pt"})
            file, group = next(pending, None), {}
    if file is not None:
        raise ValueError(f"file {file.name}: tensor {file.tensors[len(group)]} never came")


def write_index(directory: str, files: Sequence[ShardFile], stem: str = STEM) -> None:
    """Write the index of ``files`` when there is more than one (transformers' format)."""
    if len(files) < 2:
        return
    index = {
        "metadata": {"total_size": sum(f.nbytes for f in files)},
        "weight_map": {t: f.name for f in files for t in f.tensors},
    }
    with open(os.path.join(directory, index_file(stem)), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def write_safetensors(
    directory: str,
    tensors: Sequence[tuple[str, np.ndarray]],
    max_shard_bytes: int,
    stem: str = STEM,
) -> list[str]:
    """Write ``(name, array)`` pairs from this process as shards of at most ``max_shard_bytes``
    (a single tensor may exceed it), plus the index for more than one. Returns the file names
    written."""
    os.makedirs(directory, exist_ok=True)
    files = plan_shards([(n, a.nbytes) for n, a in tensors], max_shard_bytes, stem=stem)
    write_shards(directory, tensors, files)
    write_index(directory, files, stem)
    return shard_names(files, stem)
