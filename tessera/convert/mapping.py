"""The declarative mapping between Hugging Face checkpoints and tessera models.

A ``Family`` (keyed by HF ``model_type``) is two tables, plus the config an import starts from
for the sections other than ``model`` (``Family.packaged``):

  config  parts that map HF ``config.json`` keys to tessera ``model`` fields and back: ``Field``
          (one key <-> one field, with the HF default), ``Require`` (an HF value the tessera
          layers implement; anything else changes the math and is refused), ``Set`` (tessera
          fields the family always has; a config without them cannot be exported as it),
          ``Initial`` (tessera fields HF has no key for), ``Dropped`` (training-only HF
          settings tessera lacks: a warning), and multi-key parts such as
          ``families.rope.Rope``. Every part has ``from_hf`` and ``to_hf``.
  rules   one ``Rule`` per HF tensor: its name (``{layer}`` for per-layer tensors), the tessera
          parameter(s) it fills (per-layer ones relative to the block: ``mixer/wq``) and a
          ``Transform`` that works both ways (``Identity``, ``Flat``, ``Linear``,
          ``DepthwiseConv``, ``Conv2d``, ``LeadingOnes``, ``Concat``). ``Transform.region``
          lets an import read only the block of the HF tensor a shard of ours needs.

A rule applies when the model built from the config has its parameters, so one table serves every
variant of a family (biases, q/k norms and the untied head exist only when the config says so).
Per-layer tensors are stacked over the scanned layer axis by ``tessera.convert.params``.
Adding a family: a module in ``families/`` that calls ``register(Family(...))``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from tessera.configs.base import ConfigDict
from tessera.convert.errors import ConversionError
from tessera.convert.safetensors_io import DIFFUSERS_STEM, STEM

Shape = tuple[int, ...]
Index = tuple[slice, ...]  # a block of an array: one contiguous slice per axis (jax's shard index)
Finish = Callable[[np.ndarray], np.ndarray]

# -- tensors -------------------------------------------------------------------------------


class Transform(Protocol):
    """One HF tensor <-> one or more tessera parameters (per layer: without the stacked axis)."""

    def hf_shape(self, shapes: Sequence[Shape]) -> Shape:
        """The HF tensor's shape given the shapes of the tessera parameters it fills."""

    def to_ours(self, x: np.ndarray, shapes: Sequence[Shape]) -> list[np.ndarray]:
        """HF tensor -> tessera parameter values (of ``shapes``)."""

    def to_hf(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        """Tessera parameter values -> the HF tensor (exact inverse of ``to_ours``)."""

    def region(self, shapes: Sequence[Shape], k: int, index: Index) -> tuple[Index, Finish]:
        """What ``to_ours(x, shapes)[k][index]`` needs of the HF tensor ``x``: the block of ``x``
        to read (concrete slices) and the function that turns that block into the values.
        Where ``index`` is no block of the HF tensor (a slice of an inner axis that HF stores
        flattened into a wider one), the block covers more than that: whole rows of the
        flattened axis, at worst the whole tensor."""


def bounds(index: Index, shape: Shape) -> list[tuple[int, int]]:
    """(start, stop) per axis of ``index`` (contiguous slices, as jax's shard indices are)."""
    return [s.indices(n)[:2] for s, n in zip(index, shape)]


def _exact(spans: Sequence[tuple[int, int]]) -> Index:
    return tuple(slice(a, b) for a, b in spans)


def _flat_cover(spans: Sequence[tuple[int, int]], shape: Shape) -> tuple[slice, Shape, Index]:
    """Axes ``shape`` that HF stores flattened (row-major) into one axis: the range of that axis
    covering the block ``spans``, the shape of the range as our axes, and the block within it.
    The range is exact when only the first axis is sliced, else it takes whole rows."""
    if not shape:  # no axes: one element (a Linear with a single output)
        return slice(0, 1), (), ()
    (a, b), rest = spans[0], math.prod(shape[1:])
    return (
        slice(a * rest, b * rest),
        (b - a, *shape[1:]),
        (slice(0, b - a), *_exact(spans[1:])),
    )


@dataclasses.dataclass(frozen=True)
class Identity:
    """Same layout on both sides (embeddings, norm scales)."""

    def hf_shape(self, shapes: Sequence[Shape]) -> Shape:
        return tuple(shapes[0])

    def to_ours(self, x: np.ndarray, shapes: Sequence[Shape]) -> list[np.ndarray]:
        return [x]

    def to_hf(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        return xs[0]

    def region(self, shapes: Sequence[Shape], k: int, index: Index) -> tuple[Index, Finish]:
        return _exact(bounds(index, shapes[0])), lambda x: x


@dataclasses.dataclass(frozen=True)
class Flat:
    """HF keeps a flat vector that tessera splits into axes (qkv bias [H*Dh] <-> [H, Dh])."""

    def hf_shape(self, shapes: Sequence[Shape]) -> Shape:
        return (math.prod(shapes[0]),)

    def to_ours(self, x: np.ndarray, shapes: Sequence[Shape]) -> list[np.ndarray]:
        return [x.reshape(shapes[0])]

    def to_hf(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        return xs[0].reshape(-1)

    def region(self, shapes: Sequence[Shape], k: int, index: Index) -> tuple[Index, Finish]:
        flat, block, within = _flat_cover(bounds(index, shapes[0]), shapes[0])
        return (flat,), lambda x: x.reshape(block)[within]


@dataclasses.dataclass(frozen=True)
class Linear:
    """``torch.nn.Linear`` weight [out, in] <-> tessera kernel [*in_axes, *out_axes].

    ``in_dims``: how many leading tessera axes are the input (wq [D, H, Dh]: 1; wo [H, Dh, D]: 2).
    """

    in_dims: int = 1

    def _split(self, shape: Shape) -> tuple[int, int]:
        return math.prod(shape[: self.in_dims]), math.prod(shape[self.in_dims :])

    def hf_shape(self, shapes: Sequence[Shape]) -> Shape:
        fan_in, fan_out = self._split(shapes[0])
        return (fan_out, fan_in)

    def to_ours(self, x: np.ndarray, shapes: Sequence[Shape]) -> list[np.ndarray]:
        return [x.T.reshape(shapes[0])]

    def to_hf(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        return xs[0].reshape(self._split(xs[0].shape)).T

    def region(self, shapes: Sequence[Shape], k: int, index: Index) -> tuple[Index, Finish]:
        """Rows of the HF weight are our output axes flattened, columns our input axes: a
        slice of the first input (output) axis is a range of columns (rows)."""
        spans, n = bounds(index, shapes[0]), self.in_dims
        cols, in_block, in_within = _flat_cover(spans[:n], shapes[0][:n])
        rows, out_block, out_within = _flat_cover(spans[n:], shapes[0][n:])
        return (rows, cols), lambda x: x.T.reshape(*in_block, *out_block)[
            (*in_within, *out_within)
        ]


@dataclasses.dataclass(frozen=True)
class DepthwiseConv:
    """``torch.nn.Conv1d(groups=channels)`` weight [C, 1, K] <-> tessera kernel [K, C]."""

    def hf_shape(self, shapes: Sequence[Shape]) -> Shape:
        width, channels = shapes[0]
        return (channels, 1, width)

    def to_ours(self, x: np.ndarray, shapes: Sequence[Shape]) -> list[np.ndarray]:
        return [x[:, 0, :].T]

    def to_hf(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        return xs[0].T[:, None, :]

    def region(self, shapes: Sequence[Shape], k: int, index: Index) -> tuple[Index, Finish]:
        width, channels = _exact(bounds(index, shapes[0]))
        return (channels, slice(0, 1), width), lambda x: x[:, 0, :].T


@dataclasses.dataclass(frozen=True)
class Conv2d:
    """``torch.nn.Conv2d`` weight [out, in, kh, kw] (OIHW) <-> tessera kernel [kh, kw, in, out]
    (HWIO, Flax's layout)."""

    def hf_shape(self, shapes: Sequence[Shape]) -> Shape:
        kh, kw, fan_in, fan_out = shapes[0]
        return (fan_out, fan_in, kh, kw)

    def to_ours(self, x: np.ndarray, shapes: Sequence[Shape]) -> list[np.ndarray]:
        return [x.transpose(2, 3, 1, 0)]

    def to_hf(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        return xs[0].transpose(3, 2, 0, 1)

    def region(self, shapes: Sequence[Shape], k: int, index: Index) -> tuple[Index, Finish]:
        kh, kw, fan_in, fan_out = _exact(bounds(index, shapes[0]))
        return (fan_out, fan_in, kh, kw), lambda x: x.transpose(2, 3, 1, 0)


@dataclasses.dataclass(frozen=True)
class LeadingOnes:
    """HF keeps ``count`` leading axes of size 1 that tessera drops (ViT's class token
    [1, 1, D] <-> [D], position table [1, T, D] <-> [T, D])."""

    count: int = 1

    def hf_shape(self, shapes: Sequence[Shape]) -> Shape:
        return (1,) * self.count + tuple(shapes[0])

    def to_ours(self, x: np.ndarray, shapes: Sequence[Shape]) -> list[np.ndarray]:
        return [x.reshape(shapes[0])]

    def to_hf(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        return xs[0].reshape((1,) * self.count + xs[0].shape)

    def region(self, shapes: Sequence[Shape], k: int, index: Index) -> tuple[Index, Finish]:
        spans = bounds(index, shapes[0])
        block = tuple(b - a for a, b in spans)
        return (slice(0, 1),) * self.count + _exact(spans), lambda x: x.reshape(block)


@dataclasses.dataclass(frozen=True)
class Concat:
    """One fused HF tensor <-> several tessera parameters, each through ``part``, concatenated
    along HF ``axis`` (e.g. a fused gate/up projection, Mamba's in_proj)."""

    part: Transform = Identity()
    axis: int = 0

    def hf_shape(self, shapes: Sequence[Shape]) -> Shape:
        pieces = [self.part.hf_shape([s]) for s in shapes]
        total = sum(p[self.axis] for p in pieces)
        return (*pieces[0][: self.axis], total, *pieces[0][self.axis + 1 :])

    def to_ours(self, x: np.ndarray, shapes: Sequence[Shape]) -> list[np.ndarray]:
        sizes = [self.part.hf_shape([s])[self.axis] for s in shapes]
        pieces = np.split(x, np.cumsum(sizes)[:-1], axis=self.axis)
        return [self.part.to_ours(p, [s])[0] for p, s in zip(pieces, shapes)]

    def to_hf(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([self.part.to_hf([x]) for x in xs], axis=self.axis)

    def region(self, shapes: Sequence[Shape], k: int, index: Index) -> tuple[Index, Finish]:
        """Part ``k``'s block, moved past the parts before it along ``axis``."""
        offset = sum(self.part.hf_shape([s])[self.axis] for s in shapes[:k])
        block, finish = self.part.region([shapes[k]], 0, index)
        moved = slice(block[self.axis].start + offset, block[self.axis].stop + offset)
        return (*block[: self.axis], moved, *block[self.axis + 1 :]), finish


IDENTITY, FLAT, LINEAR, DEPTHWISE_CONV, CONV2D = (
    Identity(), Flat(), Linear(), DepthwiseConv(), Conv2d()
)


@dataclasses.dataclass(frozen=True, init=False)
class Rule:
    """HF tensor ``hf`` <-> tessera parameter(s) ``ours`` through ``transform``.

    ``hf`` containing ``{layer}`` makes a per-layer rule: ``ours`` is then relative to the block
    (``mixer/wq``) and ``mixer`` / ``channel`` (optional) limit it to blocks with that sequence
    or channel mixer, for hybrid stacks and DeepSeek's dense-then-MoE layers. Otherwise
    ``ours`` is a path from the root (``embed/embedding``). ``{expert}`` as well
    (``mlp.experts.{expert}.up_proj.weight``): one HF tensor per expert fills one slice of the
    parameter's expert axis, and ``transform`` maps one expert's tensor.

    ``absent``: HF layer indices whose checkpoints have no such tensor although the tessera
    block has the parameter (fla's RWKV-7 first layer has no value-residual LoRA, which
    tessera's mixer keeps unused): import fills those layers' values with zeros, export writes
    nothing for them.

    ``tied``: a per-layer HF tensor that is one tessera parameter (``ours`` from the root):
    diffusers' DiT keeps a copy of the shared conditioning embedder in every block. Import
    requires every layer's copy to be equal, export writes the parameter into each layer.
    """

    hf: str
    ours: tuple[str, ...]
    transform: Transform
    mixer: str | None
    channel: str | None
    absent: frozenset[int]
    tied: bool

    def __init__(
        self,
        hf: str,
        ours: str | Sequence[str],
        transform: Transform = IDENTITY,
        *,
        mixer: str | None = None,
        channel: str | None = None,
        absent: Sequence[int] = (),
        tied: bool = False,
    ):
        object.__setattr__(self, "hf", hf)
        object.__setattr__(self, "ours", (ours,) if isinstance(ours, str) else tuple(ours))
        object.__setattr__(self, "transform", transform)
        object.__setattr__(self, "mixer", mixer)
        object.__setattr__(self, "channel", channel)
        object.__setattr__(self, "absent", frozenset(absent))
        object.__setattr__(self, "tied", tied)

    def applies_to(self, block: Any) -> bool:
        """Whether this per-layer rule fills a block of that layout spec (mixer and channel)."""
        return self.mixer in (None, block.mixer) and self.channel in (None, block.channel)

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf

    def layer_name(self, layer: int) -> str | None:
        """The HF tensor of this per-layer rule in HF layer ``layer``; None where it is absent."""
        return None if layer in self.absent else self.hf.replace("{layer}", str(layer))

    @property
    def per_expert(self) -> bool:
        """``{expert}`` in the name: one HF tensor per expert, stacked on the parameter's expert
        axis (the first axis after the stacked layer axis)."""
        return "{expert}" in self.hf


# -- config --------------------------------------------------------------------------------

_REQUIRED = object()


class ConfigPart(Protocol):
    """Some HF config keys <-> some tessera model fields (dotted: ``rope_scaling.type``)."""

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        """Tessera model fields from the HF config (ConversionError if unsupported)."""

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        """HF config keys from the tessera model config (ConversionError if inexpressible)."""


def model_field(model: ConfigDict, dotted: str) -> Any:
    node = model
    for part in dotted.split("."):
        node = node[part]
    return node


def hf_value(
    hf: Mapping[str, Any], key: str, default: Any = _REQUIRED, keep_null: bool = False
) -> Any:
    """``hf[key]``; a missing (or, unless ``keep_null``, null) key takes ``default``: a value or
    a function of ``hf``."""
    value = hf.get(key)
    if value is not None or (keep_null and key in hf):
        return value
    if default is _REQUIRED:
        raise ConversionError(f"config.json has no {key!r}")
    try:
        return default(hf) if callable(default) else default
    except KeyError as e:
        raise ConversionError(f"config.json has no {e.args[0]!r}") from None


@dataclasses.dataclass(frozen=True)
class Field:
    """One HF key <-> one tessera field. ``default`` is HF's for a missing key, and for a null
    one unless ``keep_null`` (null then reaches ``to_ours``: Mistral's "no window")."""

    hf: str
    ours: str
    default: Any = _REQUIRED
    to_ours: Callable[[Any], Any] = lambda v: v
    to_theirs: Callable[[Any], Any] = lambda v: v
    keep_null: bool = False

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        return {self.ours: self.to_ours(hf_value(hf, self.hf, self.default, self.keep_null))}

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        return {self.hf: self.to_theirs(model_field(model, self.ours))}


@dataclasses.dataclass(frozen=True)
class Require:
    """An HF key whose value must be ``value`` (missing: HF's default, taken to be it)."""

    hf: str
    value: Any

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        got = hf.get(self.hf, self.value)
        if got != self.value:
            raise ConversionError(
                f"config.json {self.hf}={got!r} is not supported (tessera implements "
                f"{self.hf}={self.value!r})"
            )
        return {}

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        return {self.hf: self.value}


class Set:
    """Tessera model fields this family always has (``Set(qkv_bias=True)``)."""

    def __init__(self, **fields: Any):
        self.fields = fields

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.fields)

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        for name, want in self.fields.items():
            got = model_field(model, name)
            if (tuple(got) if isinstance(want, tuple) else got) != want:
                raise ConversionError(
                    f"model.{name}={got!r} has no equivalent in this Hugging Face family "
                    f"(it needs {want!r})"
                )
        return {}


class Initial:
    """Tessera fields an import starts from where HF has no key (Mamba's ``max_seq_len``);
    export writes nothing for them."""

    def __init__(self, **fields: Any):
        self.fields = fields

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.fields)

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        return {}


class Dropped:
    """An HF key for something tessera does not model and that only matters in training
    (ViT's dropout on attention probabilities): any value imports, one other than ``harmless``
    with a warning that it is dropped; export writes ``harmless``."""

    def __init__(self, hf: str, harmless: Any, why: str):
        self.hf, self.harmless, self.why = hf, harmless, why

    def from_hf(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        value = hf.get(self.hf, self.harmless)
        if value not in (None, self.harmless):
            warnings.warn(f"config.json {self.hf}={value!r} is dropped: {self.why}", stacklevel=2)
        return {}

    def to_hf(self, model: ConfigDict) -> dict[str, Any]:
        return {self.hf: self.harmless}


# -- families ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
    """How one HF ``model_type`` maps to tessera: config parts and tensor rules.

    ``ignore``: fnmatch patterns of HF tensors that may be present without a rule using them
    (rotary caches of old checkpoints, an ``lm_head`` stored next to tied embeddings).
    ``packaged``: a packaged config (``"vit"``, its default preset) whose sections other than
    ``model`` an import starts from: the task, data, optimizer and schedule of the family; ""
    (the LMs): the base config. The ``model`` section is always the base defaults plus the
    ``config`` parts. ``tokenizer``: the model reads token ids, so an import sets
    ``data.tokenizer`` from the HF tokenizer files. ``diffusers``: a diffusers model, keyed by
    its config's ``_class_name`` (``model_type`` holds it; ``architecture`` is unused) and stored
    as ``diffusion_pytorch_model.safetensors``.
    """

    model_type: str
    architecture: str
    config: tuple[ConfigPart, ...]
    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()
    packaged: str = ""
    tokenizer: bool = True
    diffusers: bool = False

    @property
    def weights_stem(self) -> str:
        """The safetensors file names' stem an export writes."""
        return DIFFUSERS_STEM if self.diffusers else STEM

    def model_fields(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        """Tessera ``model`` fields (dotted names) for an HF config of this family."""
        fields: dict[str, Any] = {"family": self.model_type}
        for part in self.config:
            try:
                fields.update(part.from_hf(hf))
            except ConversionError as e:
                raise ConversionError(f"model_type {self.model_type}: {e}") from None
        return fields

    def hf_config(self, model: ConfigDict) -> dict[str, Any]:
        """The HF ``config.json`` keys for a tessera model config of this family."""
        if float(model.get("logit_soft_cap", 0.0)) > 0:
            raise ConversionError(
                f"export as {self.model_type}: model.logit_soft_cap has no key in this family's "
                "HF config, so the export would drop it"
            )
        if self.diffusers:
            out: dict[str, Any] = {"_class_name": self.model_type}
        else:
            out = {"model_type": self.model_type, "architectures": [self.architecture]}
        for part in self.config:
            try:
                out.update(part.to_hf(model))
            except ConversionError as e:
                raise ConversionError(f"export as {self.model_type}: {e}") from None
        return out


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.model_type in FAMILIES:
        raise ValueError(f"family {family.model_type!r} is registered twice")
    FAMILIES[family.model_type] = family
    return family


def family_for(model_type: Any) -> Family:
    """The family of an HF ``model_type`` (ConversionError listing the supported ones)."""
    if model_type not in FAMILIES:
        raise ConversionError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]
