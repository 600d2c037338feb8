"""The decode engine: bucketed prefill into the model's cache, then a jitted step loop.

One engine serves every family through the model call and its cache (DESIGN.md, Caches):
``model(tokens, positions=, segment_ids=, cache=) -> ModelOutput`` with a cache from
``model.init_cache(batch, max_len, dtype)``. The engine never looks inside ``cache["layers"]``.

A request of B prompts runs as:

* **prefill**: prompts right-padded to a length bucket T (powers of two), padding marked by
  ``segment_ids`` 0 so it is never written to the cache; long buckets run as a ``scan`` over
  chunks of ``prefill_chunk`` tokens. The first new token of row b is sampled from the logits at
  ``len_b - 1``.
* **decode**: a ``while_loop`` of up to ``decode_chunk`` one-token steps per call, each row at its
  own position, rows that finished (stop token, token budget) fed as padding. Between calls the
  host streams the new tokens and checks stop strings.

Batches are padded to a power of two with empty rows and the cache length is derived from the
buckets, so each (batch, bucket) shape compiles once; executables are compiled ahead of time,
which keeps compile time out of the tokens/s figures.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tessera.data.tokenizers import ByteTokenizer, Tokenizer
from tessera.distributed import to_host
from tessera.kernels import cpu as cpu_kernels
from tessera.models.create import ModelSpec
from tessera.models.layout import parse_layout
from tessera.serve.outputs import CacheInfo, Completion, DecodeStats, HostRow
from tessera.serve.sampling import SamplingParams, sample
from tessera.sharding import MESH_AXES, is_axis_names, logical_sharding, make_rules, use_mesh

PyTree = Any
Prompt = str | Sequence[int]

# The cache holds the prompt bucket plus the token budget rounded up to this many slots.
CACHE_MULTIPLE = 64
# The cache is allocated at V slots, V the next power of two (at least MIN_CACHE_SLOTS) above every
# position the next decode call can reach, and doubles as the sequences grow (up to the request's
# full length): a step's cost and the cache's memory follow the filled length, not the token
# budget. Each V is one more compiled decode program (log2 of the full length at most).
MIN_CACHE_SLOTS = 128


def length_bucket(n: int, minimum: int = 16) -> int:
    """The padded length for a prompt of ``n`` tokens: the next power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum, 1) - 1).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    """A mesh of one device with the standard axis names."""
    device = device or jax.devices()[0]
    return Mesh(np.asarray([device]).reshape((1,) * len(MESH_AXES)), MESH_AXES)




class Decoder:
    """A model's parameters on a mesh plus compiled prefill / decode executables.

    ``spec.merge(params)`` gives the model inside jitted code; ``params`` are moved onto the
    shardings ``spec`` derives from ``mesh`` and ``rules``. Keep one Decoder for repeated calls:
    it caches an executable per (batch, length bucket, cache length, sampling) shape.
    ``unroll_layers`` (default) runs a scanned stack unrolled: ``spec`` and ``params`` become
    ``spec.unrolled()`` and its parameters (one array per layer). ``params=None`` makes an
    abstract Decoder: ``lower`` works (ahead-of-time compiles for
    another machine's devices, ``tessera.aot``), ``generate`` does not.
    """

    def __init__(
        self,
        spec: ModelSpec,
        params: PyTree | None,
        mesh: Mesh | None = None,
        rules: str | Mapping[str, tuple[str, ...]] = "",
        *,
        tokenizer: Tokenizer | None = None,
        cache_dtype: Any = None,
        prefill_chunk: int = 512,
        decode_chunk: int = 16,
        min_bucket: int = 16,
        unroll_layers: bool = True,
        grow_cache: bool | None = None,
    ):
        if prefill_chunk < 1 or decode_chunk < 1:
            raise ValueError(
                f"prefill_chunk ({prefill_chunk}) and decode_chunk ({decode_chunk}) must be >= 1"
            )
        # Decode runs the layer stack unrolled: a scanned stack slices each layer's weights out
        # of the stacked arrays every step (XLA CPU copies them before the matmul: twice the
        # bytes of a memory-bound step) and its cache updates go through the stacked buffers.
        self.spec = spec.unrolled() if unroll_layers else spec
        self.mesh = mesh if mesh is not None else single_device_mesh()
        self.rules = make_rules(rules)
        self.tokenizer = tokenizer or ByteTokenizer()
        # Growing costs a copy per doubling and a compile per size; TPU's decode kernel reads
        # only the blocks holding visible keys, so there the whole budget is allocated at once.
        self.grow_cache = (self.mesh.devices.flat[0].platform != "tpu") if grow_cache is None \
            else bool(grow_cache)
        self.cache_dtype = jnp.dtype(cache_dtype or self.spec.cfg.dtype)
        self.prefill_chunk, self.decode_chunk, self.min_bucket = (
            prefill_chunk, decode_chunk, min_bucket,
        )
        self.max_seq_len = int(self.spec.cfg.max_seq_len)
        self.vocab_size = int(self.spec.cfg.vocab_size)
        self.param_shardings = self.spec.shardings(self.mesh, self.rules)
        if params is None:
            self.params = None
        elif self.spec is spec:
            self.params = jax.device_put(params, self.param_shardings)
        else:
            self.params = jax.device_put(spec.unstack(params), self.param_shardings)
        self._model = self.spec.merge(self.spec.shapes)  # abstract: init_cache / cache_axes only
        self._executables: dict[tuple, Any] = {}
        self._memo: dict[tuple, Any] = {}  # abstract caches and shardings per shape
        self.compile_s = 0.0

    @classmethod
    def from_module(cls, model: nnx.Module, mesh: Mesh | None = None, **kwargs: Any) -> Decoder:
        """A Decoder for a live NNX model (built from a config, it keeps it as ``model.cfg``)."""
        spec = ModelSpec(model.cfg)
        return cls(spec, nnx.to_pure_dict(nnx.state(model)), mesh, **kwargs)

    @property
    def executables(self) -> list[tuple]:
        """Keys of the compiled executables: ("prefill" | "decode", shapes..., sampling...)."""
        return list(self._executables)

    # -- input checks ----------------------------------------------------------------------
    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Text prompts -> ``[bos] + tokenizer.encode(text)`` (no bos when the tokenizer's
        ``bos_id`` is None); token-id prompts are taken as they are. Empty prompts, text the
        tokenizer cannot encode and ids outside the model's vocabulary are errors naming the
        prompt."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of prompts, not one string")
        out = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if not prompt:
                    raise ValueError(f"prompt {i} is empty")
                bos = self.tokenizer.bos_id
                try:
                    ids = [*([] if bos is None else [bos]), *self.tokenizer.encode(prompt)]
                except Exception as e:
                    raise ValueError(
                        f"prompt {i}: the tokenizer cannot encode {prompt[:40]!r}: {e}"
                    ) from e
                if not ids:
                    raise ValueError(f"prompt {i}: {prompt[:40]!r} encodes to no tokens")
            else:
                ids = [int(t) for t in prompt]
                if not ids:
                    raise ValueError(f"prompt {i} is empty")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt {i}: token id {bad[0]} is outside the model's vocabulary "
                    f"[0, {self.vocab_size})"
                )
            out.append(ids)
        if not out:
            raise ValueError("no prompts given")
        return out

    def check_lengths(self, ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        """Every prompt plus ``max_new_tokens`` must fit in ``model.max_seq_len`` positions."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for i, p in enumerate(ids):
            if len(p) >= self.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens, longer than the context "
                    f"(model.max_seq_len={self.max_seq_len}, which must also fit new tokens)"
                )
            if len(p) + max_new_tokens > self.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it "
                    f"needs {len(p) + max_new_tokens} positions, more than "
                    f"model.max_seq_len={self.max_seq_len}"
                )

    # -- shapes, shardings, compiled functions ---------------------------------------------
    def _abstract_cache(self, batch: int, max_len: int) -> PyTree:
        """Shapes of ``init_cache(batch, max_len)``; traced once per shape (the trace walks the
        config, tens of ms, and every decode call asks for its program's)."""
        key = (batch, max_len)
        if key not in self._memo:
            self._memo[key] = jax.eval_shape(
                lambda: self._model.init_cache(batch, max_len, self.cache_dtype)
            )
        return self._memo[key]

    def _cache_slots(self, max_len: int) -> int:
        """Token slots S of a cache for ``max_len`` tokens (the window for ring buffers)."""
        return int(self._model.cache_length(max_len))

    def cache_slots_for(self, reach: int, max_len: int) -> int:
        """The cache slots to allocate while no position written reaches ``reach``: the next
        power of two >= ``reach`` (at least MIN_CACHE_SLOTS), or every slot of a ``max_len`` cache.
        Slots fill in order (slot = position % S), so positions below V < S live in the first V
        slots, and the cache of ``max_len`` tokens is the same with more empty slots. A sharded
        ``cache_length`` axis or ``grow_cache=False`` give every slot from the start."""
        slots = self._cache_slots(max_len)
        if not self.grow_cache or self._length_sharded:
            return slots
        return min(slots, max(MIN_CACHE_SLOTS, length_bucket(reach)))

    @functools.cached_property
    def _length_sharded(self) -> bool:
        sizes = dict(self.mesh.shape)
        return any(sizes[a] > 1 for a in self.rules.get("cache_length", ()))

    def _cache_merge(self, full: PyTree, part: PyTree) -> PyTree:
        """``part`` (a cache with fewer slots) written over ``full``'s first slots; the rest of
        ``full`` is unchanged. Arrays without a ``cache_length`` axis are ``part``'s."""
        def put(names: tuple, whole: jax.Array, piece: jax.Array) -> jax.Array:
            if "cache_length" not in names:
                return piece
            axis = names.index("cache_length")
            return jax.lax.dynamic_update_slice_in_dim(whole, piece.astype(whole.dtype), 0, axis)

        return jax.tree.map(put, self._model.cache_axes(), full, part, is_leaf=is_axis_names)

    def cache_info(self, batch: int, max_len: int) -> CacheInfo:
        """Bytes of the cache ``init_cache(batch, max_len)``, split by the logical axes: arrays
        with a ``cache_length`` axis are per token, the rest fixed per sequence."""
        cache = self._abstract_cache(batch, max_len)
        names = jax.tree.leaves(self._model.cache_axes(), is_leaf=is_axis_names)
        token = state = 0
        for axes, a in zip(names, jax.tree.leaves(cache), strict=True):
            nbytes = a.size * a.dtype.itemsize
            if "cache_length" in axes:
                token += nbytes
            else:
                state += nbytes
        mixers = sorted({spec.mixer for spec in parse_layout(self.spec.cfg).layers()})
        kinds = f"{'+'.join(mixers)}, {self.spec.cfg.num_layers} layers"
        return CacheInfo(batch, int(cache["positions"].shape[1]), int(token), int(state), kinds)

    def _abstract_state(self, batch: int, max_len: int) -> dict:
        row = lambda dtype: jax.ShapeDtypeStruct((batch,), dtype)
        return {
            "cache": self._abstract_cache(batch, max_len),
            **{k: row(jnp.int32) for k in ("token", "pos", "count", "budget", "row")},
            "done": row(jnp.bool_),
        }

    def _shardings(self, batch: int, length: int, max_len: int) -> dict[str, Any]:
        key = ("shardings", batch, length, max_len)
        if key not in self._memo:
            self._memo[key] = self._make_shardings(batch, length, max_len)
        return self._memo[key]

    def _make_shardings(self, batch: int, length: int, max_len: int) -> dict[str, Any]:
        with use_mesh(self.mesh, self.rules):
            cache = jax.tree.map(
                lambda names, a: logical_sharding(names, a.shape),
                self._model.cache_axes(),
                self._abstract_cache(batch, max_len),
                is_leaf=is_axis_names,
            )
            row = logical_sharding(("batch",), (batch,))
            return {
                "tokens": logical_sharding(("batch", "length"), (batch, length)),
                "row": row,
                "out": logical_sharding(("batch", None), (batch, self.decode_chunk)),
                "state": {
                    "cache": cache,
                    **{k: row for k in ("token", "pos", "count", "budget", "done", "row")},
                },
                "replicated": NamedSharding(self.mesh, PartitionSpec()),
            }

    def _programs(
        self, batch: int, length: int, max_len: int, chunk: int, proc: tuple,
        stop_tokens: tuple[int, ...],
    ) -> dict[str, tuple]:
        """The prefill and decode programs of one request shape (a cache of ``max_len``
        tokens): name -> (cache key, function, input shardings, output shardings, abstract
        arguments, donated arguments)."""
        sh = self._shardings(batch, length, max_len)
        row = lambda dtype: jax.ShapeDtypeStruct((batch,), dtype)
        key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
        return {
            "prefill": (
                ("prefill", batch, length, max_len, chunk, proc, stop_tokens),
                functools.partial(self._prefill, proc, stop_tokens, max_len, chunk),
                (self.param_shardings, sh["tokens"], sh["row"], sh["row"], sh["row"],
                 sh["replicated"]),
                sh["state"],
                (self.spec.shapes, jax.ShapeDtypeStruct((batch, length), jnp.int32),
                 row(jnp.int32), row(jnp.int32), row(jnp.int32), key),
                (),
            ),
            "decode": (
                ("decode", batch, max_len, self.decode_chunk, proc, stop_tokens),
                functools.partial(self._decode, proc, stop_tokens),
                (self.param_shardings, sh["state"], sh["row"], sh["replicated"]),
                (sh["state"], sh["out"], sh["replicated"]),
                (self.spec.shapes, self._abstract_state(batch, max_len), row(jnp.bool_), key),
                (1,),
            ),
        }

    def _grow_program(self, batch: int, old: int, new: int) -> tuple:
        """The program that moves a decode state from a cache of ``old`` slots to ``new``: the
        filled slots copied, the rest as ``init_cache`` leaves them (the old state is dropped by
        the caller)."""
        def grow(state: dict) -> dict:
            with use_mesh(self.mesh, self.rules):
                fresh = self._model.init_cache(batch, new, self.cache_dtype)
                return {**state, "cache": self._cache_merge(fresh, state["cache"])}

        return (
            ("grow", batch, old, new), grow, (self._shardings(batch, 1, old)["state"],),
            self._shardings(batch, 1, new)["state"], (self._abstract_state(batch, old),),
            (),  # a smaller cache cannot hold the larger one: nothing to donate
        )

    @staticmethod
    def _lower(program: tuple) -> jax.stages.Lowered:
        _, fn, in_sh, out_sh, args, donate = program
        jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=donate)
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), args, in_sh
        )
        with cpu_kernels.decoding():  # auto may pick the CPU decode kernels (float32 on CPU)
            return jitted.lower(*abstract)

    def _compile(self, program: tuple) -> Any:
        key = program[0]
        if key not in self._executables:
            t0 = time.perf_counter()
            self._executables[key] = self._lower(program).compile()
            self.compile_s += time.perf_counter() - t0
        return self._executables[key]

    def request_shape(self, batch: int, prompt_len: int, max_new_tokens: int) -> dict[str, int]:
        """The padded shape a request of ``batch`` prompts of up to ``prompt_len`` tokens runs
        at: batch (a power of two), prompt bucket, prefill chunk and cache length."""
        batch = 1 << (max(batch, 1) - 1).bit_length()
        length = length_bucket(prompt_len, self.min_bucket)
        chunk = min(length, self.prefill_chunk)
        length = _round_up(length, chunk)
        max_len = min(self.max_seq_len, length + _round_up(max_new_tokens, CACHE_MULTIPLE))
        return {"batch": batch, "length": length, "chunk": chunk, "max_len": max_len}

    def lower(
        self,
        batch: int,
        prompt_len: int,
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        stop_tokens: Sequence[int] = (),
    ) -> dict[str, jax.stages.Lowered]:
        """The prefill and decode-loop programs ``generate`` compiles for such a request, lowered
        for this Decoder's mesh (``.compile()`` them, read ``memory_analysis()``)."""
        shape = self.request_shape(batch, prompt_len, max_new_tokens)
        proc = (sampling or SamplingParams()).processing()
        programs = self._programs(
            shape["batch"], shape["length"], shape["max_len"], shape["chunk"], proc,
            tuple(int(t) for t in stop_tokens),
        )
        return {name: self._lower(program) for name, program in programs.items()}

    def _prefill(
        self, processing: tuple, stop_tokens: tuple[int, ...], max_len: int, chunk: int,
        params: PyTree, tokens: jax.Array, lengths: jax.Array, rows: jax.Array,
        budget: jax.Array, key: jax.Array,
    ) -> dict:
        """tokens [B, T] right-padded, lengths [B] -> decode state with the first new token."""
        with use_mesh(self.mesh, self.rules):
            b, t = tokens.shape
            cache = self.spec.merge(params).init_cache(b, max_len, self.cache_dtype)
            chunks = tokens.reshape(b, t // chunk, chunk).transpose(1, 0, 2)
            starts = jnp.arange(t // chunk, dtype=jnp.int32) * chunk

            def body(carry, xs):
                cache, last = carry
                toks, start = xs
                pos = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
                seg = (pos < lengths[:, None]).astype(jnp.int32)
                out = self.spec.merge(params)(toks, positions=pos, segment_ids=seg, cache=cache)
                idx = lengths - 1 - start
                hit = (idx >= 0) & (idx < chunk)
                at = jnp.clip(idx, 0, chunk - 1)[:, None, None]
                picked = jnp.take_along_axis(out.logits, at, axis=1)[:, 0].astype(jnp.float32)
                return (out.cache, jnp.where(hit[:, None], picked, last)), None

            last = jnp.zeros((b, self.vocab_size), jnp.float32)
            (cache, last), _ = jax.lax.scan(body, (cache, last), (chunks, starts))
            first = sample(last, processing, key, rows, lengths)
            count = jnp.ones_like(lengths)
            done = jnp.isin(first, jnp.asarray(stop_tokens, jnp.int32)) | (count >= budget)
            return {
                "cache": cache, "token": first, "pos": lengths, "count": count,
                "budget": budget, "done": done, "row": rows,
            }

    def _decode(
        self, processing: tuple, stop_tokens: tuple[int, ...], params: PyTree, state: dict,
        force_done: jax.Array, key: jax.Array,
    ) -> tuple[dict, jax.Array, jax.Array]:
        """Up to ``decode_chunk`` steps (every position they write must fit the state's cache);
        returns the state, new tokens [B, N] (-1: none) and the number of steps run (stops early
        once every row is done)."""
        with use_mesh(self.mesh, self.rules):
            b, n = state["token"].shape[0], self.decode_chunk
            stops = jnp.asarray(stop_tokens, jnp.int32)
            state = {**state, "done": state["done"] | force_done}

            def cond(carry):
                i, st, _ = carry
                return (i < n) & ~jnp.all(st["done"])

            def body(carry):
                i, st, out = carry
                active = ~st["done"]
                model = self.spec.merge(params)
                o = model(
                    st["token"][:, None],
                    positions=st["pos"][:, None],
                    segment_ids=active[:, None].astype(jnp.int32),  # done rows are not written
                    cache=st["cache"],
                )
                pos = st["pos"] + 1
                nxt = sample(o.logits[:, 0], processing, key, st["row"], pos)
                nxt = jnp.where(active, nxt, -1)
                count = st["count"] + active
                stopped = jnp.isin(nxt, stops) | (count >= st["budget"])
                st = {
                    **st,
                    "cache": o.cache,
                    "token": jnp.where(active, nxt, st["token"]),
                    "pos": jnp.where(active, pos, st["pos"]),
                    "count": count,
                    "done": st["done"] | (active & stopped),
                }
                return i + 1, st, out.at[:, i].set(nxt)

            out = jnp.full((b, n), -1, jnp.int32)
            steps, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out))
            return state, out, steps

    # -- generation ------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingParams | None = None,
        max_new_tokens: int = 32,
        *,
        stop: Sequence[str] = (),
        stop_tokens: Sequence[int] | None = None,
        first_row: int = 0,
        batch_size: int | None = None,
        on_update: Callable[[int, Completion], None] | None = None,
        stats: DecodeStats | None = None,
    ) -> list[Completion]:
        """Complete every prompt (text, or token ids taken as they are) in one batch.

        Rows stop at a stop token (default the tokenizer's EOS; ``()`` for none), a stop string
        (checked on the host after each decode chunk) or after ``max_new_tokens``. ``first_row``
        is prompts[0]'s index in a larger request: it seeds each row's sampling, so results do not
        depend on how a request is split into batches. The batch is padded with empty rows to
        the next power of two of ``max(len(prompts), batch_size)``, so a last, short batch of a
        file reuses the executables of the full ones. ``on_update(i, partial_completion)`` is
        called as tokens arrive (streaming); ``stats`` accumulates counts and timings.
        """
        if self.params is None:
            raise ValueError("this Decoder is abstract (params=None): it can lower, not generate")
        sampling = sampling or SamplingParams()
        ids = self.encode(prompts)
        self.check_lengths(ids, max_new_tokens)
        stop = tuple(stop)
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        stop_tokens = tuple(
            int(t) for t in ((self.tokenizer.eos_id,) if stop_tokens is None else stop_tokens)
        )
        texts = [p if isinstance(p, str) else None for p in prompts]
        rows = [
            HostRow(t, p, self.tokenizer, stop, stop_tokens, max_new_tokens)
            for t, p in zip(texts, ids)
        ]
        n = len(ids)
        shape = self.request_shape(max(n, batch_size or 1), max(map(len, ids)), max_new_tokens)
        batch, length, max_len = shape["batch"], shape["length"], shape["max_len"]

        tokens = np.full((batch, length), self.tokenizer.pad_id, np.int32)
        lengths = np.ones((batch,), np.int32)  # padding rows: one pad token, budget 0
        for i, p in enumerate(ids):
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
        budget = np.zeros((batch,), np.int32)
        budget[:n] = max_new_tokens
        row_ids = np.arange(first_row, first_row + batch, dtype=np.int32)
        key = np.asarray(jax.random.key_data(jax.random.key(sampling.seed)))

        proc, longest = sampling.processing(), max(map(len, ids))

        def program(name: str, slots: int) -> Any:
            """The compiled prefill or decode program for a cache of ``slots`` token slots."""
            return self._compile(
                self._programs(batch, length, slots, shape["chunk"], proc, stop_tokens)[name]
            )

        compile_before = self.compile_s
        slots = self.cache_slots_for(length, max_len)  # the prompt bucket; grows with the rows
        sh = self._shardings(batch, length, slots)
        prefill = program("prefill", slots)
        put = lambda x, s: jax.device_put(x, s)
        key_dev = put(key, sh["replicated"])

        t0 = time.perf_counter()
        state = prefill(
            self.params, put(tokens, sh["tokens"]), put(lengths, sh["row"]),
            put(row_ids, sh["row"]), put(budget, sh["row"]), key_dev,
        )
        first = to_host(state["token"])
        t1 = time.perf_counter()

        def take(new_tokens: np.ndarray) -> None:
            for i, row in enumerate(rows):
                if row.feed([int(t) for t in new_tokens[i] if t >= 0]) and on_update:
                    on_update(i, row.completion())

        take(first[:, None])
        decode_tokens = decode_steps = 0
        compile_at_t1 = self.compile_s  # programs compiled on the way are not decode time
        calls: list[tuple[int, float, int]] = []
        device_done = to_host(state["done"])
        while not all(device_done[i] or row.finish for i, row in enumerate(rows)):
            force = np.zeros((batch,), bool)
            force[:n] = [row.finish is not None for row in rows]
            need = self.cache_slots_for(longest + decode_steps + self.decode_chunk, max_len)
            if need != slots:  # the next call could write past the cache: double it
                state = self._compile(self._grow_program(batch, slots, need))(state)
                slots = need
            decode = program("decode", slots)
            t_call = time.perf_counter()
            state, out, steps = decode(self.params, state, put(force, sh["row"]), key_dev)
            out, device_done = to_host(out), to_host(state["done"])
            calls.append((int(steps), time.perf_counter() - t_call, slots))
            decode_steps += int(steps)
            decode_tokens += int((out[:n] >= 0).sum())
            take(out)
        t2 = time.perf_counter()

        if stats is not None:
            stats.prompts += n
            stats.prefill_tokens += int(sum(map(len, ids)))
            stats.prefill_s += t1 - t0
            stats.decode_tokens += decode_tokens
            stats.decode_steps += decode_steps
            stats.decode_s += t2 - t1 - (self.compile_s - compile_at_t1)
            stats.compile_s += self.compile_s - compile_before
            stats.cache = self.cache_info(batch, slots)  # as the request left it
            stats.calls += calls
        return [row.completion() for row in rows]


def generate(
    model: Decoder | nnx.Module,
    prompts: Sequence[Prompt],
    sampling: SamplingParams | None = None,
    max_new_tokens: int = 32,
    **kwargs: Any,
) -> list[Completion]:
    """Complete ``prompts`` with ``model`` (a Decoder, or an NNX LM on one device).

    Keyword arguments go to ``Decoder.generate`` (stop, stop_tokens, on_update, stats, ...).
    Wrapping an NNX module compiles afresh on every call: keep a ``Decoder`` to reuse.
    """
    decoder = model if isinstance(model, Decoder) else Decoder.from_module(model)
    return decoder.generate(prompts, sampling, max_new_tokens, **kwargs)

