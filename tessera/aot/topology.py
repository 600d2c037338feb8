"""TPU topologies by name, and what each chip generation holds (HBM, peak FLOP/s, bandwidth).

A topology is given as a Cloud TPU accelerator type, ``v5p-128`` (v4 / v5p / tpu7x name
TensorCores: 64 chips; v5e / v6e name chips), or as a chip grid, ``v5p:4x4x4`` / ``v6e:8x8``.
``topology_devices`` asks libtpu for the devices of that slice (``num_slices`` slices joined by
DCN) without any TPU on this machine: programs lower and compile for them, nothing runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: figures per chip, from Google's Cloud TPU system-architecture pages."""

    name: str  # the prefix of topology names: v5p, v6e, ...
    device_kind: str  # jax's device_kind for it
    hbm_bytes: int  # HBM per chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    dims: int  # torus dimensions (2: v5e/v6e, 3: v4/v5p/tpu7x)
    cores_per_chip: int  # TensorCores counted by the accelerator-type name (v5p-8 = 4 chips)


# HBM bandwidth per chip (``hbm_bandwidth``, decimal bytes/s; the decode report's roofline divides
# by it), as Google's Cloud TPU system-architecture pages publish it,
# cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e,tpu7x}: v4 1200 GBps, v5e 819 GBps, v5p 2765 GBps,
# v6e (Trillium) 1640 GBps, tpu7x (Ironwood) 7380 GBps on its page (7.37 TB/s at launch).
CHIPS = {
    c.name: c
    for c in (
        Chip("v4", "TPU v4", 32 * GiB, 275e12, 1.2e12, 3, 2),
        Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9, 2, 1),
        Chip("v5p", "TPU v5", 95 * GiB, 459e12, 2.765e12, 3, 2),
        Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1.64e12, 2, 1),
        Chip("tpu7x", "TPU7x", 192 * GiB, 2307e12, 7.37e12, 3, 2),
    )
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p", "v7x": "tpu7x"}

# Chip grids of the standard slice shapes, by chip count.
_GRIDS = {
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    3: {
        4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
        256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16",
        8192: "16x16x32",
    },
}


class TopologyError(ValueError):
    """A topology name tessera cannot turn into a TPU slice."""


class LibtpuMissingError(RuntimeError):
    """libtpu is not installed, so nothing can be compiled for a TPU on this machine."""


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: Chip
    grid: str  # chips per slice, "4x4x4"
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(int(n) for n in self.grid.split("x"))

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def name(self) -> str:
        """Accelerator-type spelling, ``v5p-128`` (and ``2x v5p-128`` for several slices)."""
        one = f"{self.chip.name}-{self.chips_per_slice * self.chip.cores_per_chip}"
        return one if self.num_slices == 1 else f"{self.num_slices}x {one}"


def parse_topology(text: str, num_slices: int = 1) -> Topology:
    """``v5p-128`` / ``v5e-16`` / ``v6e:8x8`` / ``v5p:4x4x4`` -> Topology, or a TopologyError
    naming the generations and sizes that exist."""
    if num_slices < 1:
        raise TopologyError(f"num_slices must be >= 1, got {num_slices}")
    m = re.fullmatch(r"\s*([a-z0-9]+?)\s*([-:])\s*([0-9x]+)\s*", text.lower())
    gens = ", ".join(CHIPS)
    if not m:
        raise TopologyError(
            f"unknown topology {text!r}: expected e.g. v5p-128, v6e-64 or v5p:4x4x4 "
            f"(generations: {gens})"
        )
    gen, sep, size = m.groups()
    chip = CHIPS.get(_ALIASES.get(gen, gen))
    if chip is None:
        raise TopologyError(f"unknown TPU generation {gen!r} in {text!r} (known: {gens})")
    if sep == ":":
        dims = size.split("x")
        if len(dims) != chip.dims or not all(d.isdigit() and int(d) > 0 for d in dims):
            example = "x".join(["4"] * chip.dims)
            raise TopologyError(
                f"topology {text!r}: {chip.name} chip grids have {chip.dims} dimensions, "
                f"e.g. {chip.name}:{example}"
            )
        return Topology(chip, "x".join(dims), num_slices)
    if not size.isdigit() or int(size) % chip.cores_per_chip:
        raise TopologyError(
            f"topology {text!r}: the size after '-' counts "
            f"{'TensorCores, 2 per chip' if chip.cores_per_chip == 2 else 'chips'}"
        )
    chips = int(size) // chip.cores_per_chip
    grid = _GRIDS[chip.dims].get(chips)
    if grid is None:
        sizes = ", ".join(f"{chip.name}-{n * chip.cores_per_chip}" for n in _GRIDS[chip.dims])
        raise TopologyError(f"unknown topology {text!r}: {chip.name} slices are {sizes}")
    return Topology(chip, grid, num_slices)


@contextlib.contextmanager
def _captured_stderr():
    """Send file descriptor 2 to a temporary file (libtpu writes there from C++), yielding a
    function that returns what was written."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: (tmp.seek(0), tmp.read().decode(errors="replace"))[1]
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def quiet_libtpu_env() -> None:
    """Tell libtpu this host is a single worker with no metadata server, so looking up a
    topology on a machine without TPUs does not print initialisation errors."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # Several processes (test workers, a second tool run) may each hold libtpu: they compile
    # only, so they do not contend for chips.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def have_libtpu() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: Topology) -> list:
    """The devices of ``topology`` (``slice_index`` set across slices) from libtpu."""
    if not have_libtpu():
        raise LibtpuMissingError(
            "libtpu is not installed, so nothing can be compiled for a TPU here: "
            "pip install 'tessera[tpu]' (Linux x86-64 only)"
        )
    quiet_libtpu_env()
    from jax.experimental import topologies

    kwargs = {"num_slices": topology.num_slices} if topology.num_slices > 1 else {}
    if topology.chip.name == "v4":
        kwargs["chip_config_name"] = "megacore"  # one device per chip, as v4 slices run
    try:
        # libtpu prints host-discovery warnings that do not apply to a topology description.
        with _captured_stderr():
            desc = topologies.get_topology_desc(
                topology_name=f"{topology.chip.name}:{topology.grid}", platform="tpu", **kwargs
            )
    except Exception as e:  # libtpu's errors are long multi-line texts
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TopologyError(f"libtpu cannot build topology {topology.name}: {first}") from None
    return list(desc.devices)
