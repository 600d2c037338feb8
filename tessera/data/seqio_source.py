"""seqio Tasks and Mixtures as a source of the LM pipeline (`data.source="seqio"`).

`data.task` names a registered seqio Task or Mixture; `data.registry_module` (a dotted module
name or a path to a .py file) is imported first, once per process, so the user's
`seqio.TaskRegistry.add(...)` calls run. TensorFlow (which seqio needs) is imported only here, on
first use, with its GPUs hidden (tf.data runs on the CPU; the accelerators stay jax's) and its C++
log level at errors (`TF_CPP_MIN_LOG_LEVEL`, unless already set).

Documents: one per seqio example, the 1-D int32 ids of `"inputs"` followed by `"targets"` when
the task's output features have `"inputs"` (a prefix-LM document: the model learns the inputs
too), else `"targets"` alone. Nothing is added: the EOS (or none) is whatever the task's
preprocessors produce (`seqio.preprocessors.append_eos`), and no BOS is prepended. The packer
cuts documents longer than a row itself, so by default seqio gets `sequence_length=None` and
truncates nothing; `data.feature_lengths` ("inputs=512,targets=128") passes lengths to seqio for
tasks whose preprocessors need them (and then seqio truncates to them).

Streams: stream s of S reads `get_dataset(split, shuffle=train, seed=stream_seed(seed, s),
shard_info=ShardInfo(s, S), num_epochs=None for train, 1 for eval)`, so streams are disjoint and
the global batch does not depend on the number of processes (see `pipeline.make_pipeline`). The
split names are `data.train_split` / `data.eval_split` ("train" / "validation").

Resume: a stream's state is the number of examples it has consumed; a restored iterator rebuilds
the (deterministic, seeded) tf.data pipeline and skips that many examples, so resuming costs
reading them again.

`data.tokenizer="seqio"` (`seqio_tokenizer`): the task's targets vocabulary behind tessera's
`Tokenizer` protocol, so decode and evaluation use the training ids.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import grain
import numpy as np

SEQIO = "seqio"
_REGISTRIES: dict[str, Any] = {}  # registry_module spec (resolved) -> imported module


@contextlib.contextmanager
def _quiet_native_stderr(enabled: bool) -> Iterator[None]:
    """Sends file descriptor 2 to /dev/null while TensorFlow loads: its C++ libraries log through
    absl before any log level applies (oneDNN, CUDA-driver probes), which TF_CPP_MIN_LOG_LEVEL
    does not reach. Python exceptions still propagate with their messages."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _quiet() -> bool:
    """Whether TF's load-time messages are dropped: unless TF_CPP_MIN_LOG_LEVEL asks for INFO
    (0). (jax sets it to 1 when unset.)"""
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1").strip() not in ("", "0")


def import_tensorflow() -> Any:
    """`tensorflow`, imported on first use with its log noise down (its load-time C++ messages
    dropped unless TF_CPP_MIN_LOG_LEVEL=0, and TF_CPP_MIN_LOG_LEVEL=3 when unset) and no GPUs
    visible to it (jax keeps them); later calls return the same module."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _quiet_native_stderr(_quiet() and "tensorflow" not in sys.modules):
        import tensorflow as tf

        try:
            tf.config.set_visible_devices([], "GPU")
        except (RuntimeError, ValueError):  # devices already initialised: hidden before, or none
            pass
    return tf


def import_seqio() -> Any:
    """The `seqio` module (after `import_tensorflow`); a one-line ImportError without it."""
    import_tensorflow()
    try:
        with _quiet_native_stderr(_quiet() and "seqio" not in sys.modules):
            import seqio
    except ImportError as e:
        raise ImportError(
            f"data.source='seqio' needs the seqio package: pip install 'tessera[seqio]' ({e})"
        ) from None
    return seqio


def import_registry(spec: str) -> Any:
    """Imports `data.registry_module` once per process: a dotted module name, or a path to a .py
    file (loaded under a private module name). Returns the module. A missing file is a
    FileNotFoundError, a missing module a ValueError, each one line; errors raised by the module
    itself propagate."""
    spec = str(spec).strip()
    is_path = spec.endswith(".py") or os.sep in spec
    key = os.path.abspath(os.path.expanduser(spec)) if is_path else spec
    if key in _REGISTRIES:
        return _REGISTRIES[key]
    import_seqio()  # registrations need it, and TF must come in through import_tensorflow
    if is_path:
        if not os.path.isfile(key):
            raise FileNotFoundError(f"data.registry_module {spec!r}: no such file")
        name = "_tessera_seqio_registry_" + hashlib.sha1(key.encode()).hexdigest()[:12]
        loader_spec = importlib.util.spec_from_file_location(name, key)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"data.registry_module {spec!r} cannot be loaded as a Python file")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    else:
        try:
            module = importlib.import_module(spec)
        except ModuleNotFoundError as e:
            if e.name and (spec == e.name or spec.startswith(e.name + ".")):
                raise ValueError(
                    f"data.registry_module {spec!r}: no module named {e.name!r} (a dotted module "
                    "name on the Python path, or a path to a .py file)"
                ) from None
            raise
    _REGISTRIES[key] = module
    return module


def get_provider(data_cfg: Any) -> Any:
    """The seqio Task or Mixture `data.task` names (after importing `data.registry_module`); an
    unset or unregistered name is a one-line ValueError listing some registered names."""
    seqio = import_seqio()
    registry = str(data_cfg.get("registry_module", "") or "")
    if registry:
        import_registry(registry)
    name = str(data_cfg.get("task", "") or "")
    if not name:
        raise ValueError(
            "data.source='seqio' needs data.task, the name of a registered seqio Task or Mixture"
        )
    if name in seqio.MixtureRegistry.names():
        return seqio.MixtureRegistry.get(name)
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    close = difflib.get_close_matches(name, known, n=3)
    shown = close + [k for k in known if k not in close][: 5 - len(close)]
    more = f" and {len(known) - len(shown)} more" if len(known) > len(shown) else ""
    listed = f"registered: {', '.join(shown)}{more}" if known else "no tasks are registered"
    where = f" after importing data.registry_module={registry!r}" if registry else (
        " (set data.registry_module to the module that registers it)"
    )
    raise ValueError(f"data.task={name!r} is not a registered seqio Task or Mixture{where}; "
                     f"{listed}")


def document_keys(provider: Any) -> tuple[str, ...]:
    """The features a document is made of: ("inputs", "targets") when the task has inputs,
    else ("targets",)."""
    features = provider.output_features
    if "targets" not in features:
        raise ValueError(
            f"seqio task {provider.name!r} has no 'targets' feature (has {', '.join(features)}); "
            "tessera's LM documents are its inputs + targets"
        )
    return ("inputs", "targets") if "inputs" in features else ("targets",)


def feature_lengths(data_cfg: Any, provider: Any) -> dict[str, int] | None:
    """`data.feature_lengths` ("inputs=512,targets=128") as seqio's `sequence_length`; None (seqio
    truncates nothing) when unset."""
    spec = str(data_cfg.get("feature_lengths", "") or "").strip()
    if not spec:
        return None
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in provider.output_features:
            raise ValueError(
                f"data.feature_lengths item {item!r} must be FEATURE=LENGTH with FEATURE one of "
                f"{', '.join(provider.output_features)}"
            )
        try:
            out[key] = int(value)
        except ValueError:
            raise ValueError(
                f"data.feature_lengths item {item!r}: {value!r} is not an int"
            ) from None
        if out[key] < 1:
            raise ValueError(f"data.feature_lengths item {item!r}: the length must be >= 1")
    return out


def seqio_split(data_cfg: Any, split: str) -> str:
    """The seqio split of tessera's `split`: `data.train_split` for "train", `data.eval_split`
    for "eval"."""
    if split == "train":
        return str(data_cfg.get("train_split", "train") or "train")
    if split == "eval":
        return str(data_cfg.get("eval_split", "validation") or "validation")
    raise ValueError(f"unknown split {split!r}; known: train, eval")


def _check_vocab(provider: Any, keys: Iterable[str], vocab_size: int | None) -> None:
    if vocab_size is None:
        return
    for key in keys:
        size = int(provider.output_features[key].vocabulary.vocab_size)
        if size > vocab_size:
            raise ValueError(
                f"seqio task {provider.name!r}: the {key!r} vocabulary has {size} ids, more "
                f"than model.vocab_size={vocab_size}"
            )


def quiet_options(ds: Any) -> Any:
    """`ds` deterministic and without tf.data's autotuning: each autotuned iterator runs a model
    thread that its destructor waits for (up to the autotune period, which grows to minutes),
    and tessera runs one pipeline per stream."""
    tf = import_tensorflow()
    options = tf.data.Options()
    options.autotune.enabled = False
    options.deterministic = True
    return ds.with_options(options)


class SeqioDocuments(grain.IterDataset):
    """One stream's documents (1-D int32 token arrays, see the module docstring) of a seqio Task
    or Mixture; its iterator's state is JSON `{"task", "split", "examples"}`.

    Registry, task, split and vocabulary errors are raised here, on construction; the tf.data
    pipeline is built on the iterator's first `next`. With `vocab_size`, a vocabulary or token id
    the model cannot embed is an error.
    """

    def __init__(
        self,
        data_cfg: Any,
        *,
        split: str,
        stream: int = 0,
        num_streams: int = 1,
        seed: int = 0,
        vocab_size: int | None = None,
    ):
        super().__init__()
        if not 0 <= stream < num_streams:
            raise ValueError(f"stream {stream} not in [0, num_streams={num_streams})")
        self.provider = get_provider(data_cfg)
        self.keys = document_keys(self.provider)
        self.split = seqio_split(data_cfg, split)
        self.train = split == "train"
        splits = tuple(getattr(self.provider, "splits", ()) or ())
        if splits and self.split not in splits:
            key = "data.train_split" if self.train else "data.eval_split"
            raise ValueError(
                f"seqio task {self.provider.name!r} has no split {self.split!r} (has "
                f"{', '.join(splits)}); set {key}"
            )
        _check_vocab(self.provider, self.keys, vocab_size)
        self.sequence_length = feature_lengths(data_cfg, self.provider)
        self.stream, self.num_streams, self.seed = stream, num_streams, seed
        self.vocab_size = vocab_size

    def tf_dataset(self) -> Any:
        """This stream's examples as seqio gives them (a tf.data.Dataset of feature dicts)."""
        seqio = import_seqio()
        return quiet_options(self.provider.get_dataset(
            sequence_length=self.sequence_length,
            split=self.split,
            shuffle=self.train,
            seed=self.seed,
            shard_info=seqio.ShardInfo(index=self.stream, num_shards=self.num_streams),
            num_epochs=None if self.train else 1,
        ))

    def document(self, example: Mapping[str, Any]) -> np.ndarray:
        """The token ids of one seqio example: its `keys` features concatenated, int32."""
        parts = []
        for key in self.keys:
            ids = np.asarray(example[key])
            if ids.ndim != 1:
                raise ValueError(
                    f"seqio task {self.provider.name!r}: feature {key!r} has shape {ids.shape}; "
                    "tessera reads 1-D token sequences"
                )
            parts.append(ids.astype(np.int32))
        ids = np.concatenate(parts)
        if self.vocab_size is not None:
            from tessera.data.pipeline import check_ids

            check_ids(ids, self.vocab_size)
        return ids

    def __iter__(self) -> SeqioIterator:
        return SeqioIterator(self)

    def __str__(self) -> str:
        return (
            f"SeqioDocuments({self.provider.name!r}, split={self.split!r}, "
            f"stream={self.stream}/{self.num_streams})"
        )


class SeqioIterator(grain.DatasetIterator):
    """Iterates a `SeqioDocuments`; the state counts the examples consumed, and `set_state`
    rebuilds the pipeline and skips that many (lazily, on the next `next`)."""

    def __init__(self, docs: SeqioDocuments):
        super().__init__()
        self._docs = docs
        self._consumed = 0
        self._it: Any = None

    def __next__(self) -> np.ndarray:
        docs = self._docs
        if self._it is None:
            ds = docs.tf_dataset()
            if self._consumed:
                ds = ds.skip(self._consumed)
            self._it = ds.as_numpy_iterator()
        try:
            example = next(self._it)
        except StopIteration:
            if docs.train:
                raise ValueError(
                    f"stream {docs.stream} of {docs.num_streams} of seqio task "
                    f"{docs.provider.name!r} split {docs.split!r} gets no examples (fewer "
                    "examples than data.streams?)"
                ) from None
            raise
        self._consumed += 1
        return docs.document(example)

    def get_state(self) -> dict[str, Any]:
        return {
            "task": self._docs.provider.name,
            "split": self._docs.split,
            "examples": self._consumed,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        expected = {"task": self._docs.provider.name, "split": self._docs.split}
        diff = [f"{k}={state.get(k)!r} (now {v!r})" for k, v in expected.items()
                if state.get(k) != v]
        if diff or not isinstance(state.get("examples"), int) or state["examples"] < 0:
            raise ValueError(
                f"seqio stream state {state!r} does not match this stream: "
                f"{', '.join(diff) or 'examples must be an int >= 0'}"
            )
        if state["examples"] != self._consumed or self._it is None:
            self._consumed = state["examples"]
            self._it = None


def seqio_stream(
    data_cfg: Any,
    *,
    split: str,
    stream: int,
    num_streams: int,
    seed: int,
    vocab_size: int | None = None,
) -> SeqioDocuments:
    """The token IterDataset of one stream of the LM pipeline for `data.source="seqio"`; `seed`
    is the stream's seed (`pipeline.stream_seed`)."""
    tokenizer = str(data_cfg.get("tokenizer", "") or "")
    if tokenizer == "byte":
        raise ValueError(
            "data.source='seqio' reads the token ids of the task's own vocabulary; set "
            "data.tokenizer=seqio so decoding and evaluation use the same ids"
        )
    return SeqioDocuments(
        data_cfg,
        split=split,
        stream=stream,
        num_streams=num_streams,
        seed=seed,
        vocab_size=vocab_size,
    )


class SeqioTokenizer:
    """A seqio `Vocabulary` behind tessera's `Tokenizer` protocol.

    `pad_id`, `eos_id`, `vocab_size` are the vocabulary's; `bos_id` is None, since seqio's
    preprocessors start documents without one (so decode prompts match the training documents).
    `encode` adds nothing; `decode` is the vocabulary's (it stops after the first EOS and maps
    ids past the base vocabulary to UNK).
    """

    def __init__(self, vocabulary: Any, name: str = ""):
        if vocabulary.eos_id is None:
            raise ValueError(
                f"the seqio vocabulary of {name or vocabulary!r} has no EOS id; tessera needs one "
                "to stop decoding"
            )
        self.vocabulary = vocabulary
        self.name = name

    @property
    def pad_id(self) -> int:
        return int(self.vocabulary.pad_id)

    @property
    def bos_id(self) -> int | None:
        return None

    @property
    def eos_id(self) -> int:
        return int(self.vocabulary.eos_id)

    @property
    def vocab_size(self) -> int:
        return int(self.vocabulary.vocab_size)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no EOS added."""
        return [int(t) for t in self.vocabulary.encode(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, up to the first EOS."""
        text = self.vocabulary.decode([int(t) for t in ids])
        return text.decode("utf-8") if isinstance(text, bytes) else str(text)

    def __repr__(self) -> str:
        return f"SeqioTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def seqio_tokenizer(data_cfg: Any) -> SeqioTokenizer:
    """`data.tokenizer="seqio"`: the targets vocabulary of `data.task` (registry imported)."""
    if data_cfg is None:
        raise ValueError("data.tokenizer='seqio' needs the data config (data.task)")
    provider = get_provider(data_cfg)
    document_keys(provider)
    return SeqioTokenizer(provider.output_features["targets"].vocabulary, provider.name)
