"""The one train loop shared by every family.

``train(config, workdir)`` builds the mesh, the model (parameters created sharded), the optimizer
and the data pipeline; resumes from the latest checkpoint in ``workdir`` if there is one; runs
jitted steps; logs to the console, ``metrics.jsonl`` and TensorBoard; saves checkpoints every
``checkpoint.every`` steps, at the end, and on SIGTERM / SIGINT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from tessera.configs.base import ConfigDict
from tessera.data import check_vocab, get_tokenizer, make_pipeline, unigram_entropy
from tessera.models.create import ModelSpec, abstract_arrays
from tessera.sharding import logical_sharding, make_mesh, make_rules, use_mesh
from tessera.train import flops as flops_lib
from tessera.train.checkpoints import Checkpointer
from tessera.train.metrics import MetricsWriter
from tessera.train.optimizers import decay_mask, make_optimizer
from tessera.train.tasks import get_task

PyTree = Any


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf and ``train.nan_policy`` is ``stop``."""


@dataclasses.dataclass
class TrainResult:
    step: int  # last completed step
    losses: dict[int, float]  # per step, for the steps this run executed
    last_metrics: dict[str, float]
    interrupted: bool = False
    resumed_from: int | None = None


def _validate(config: ConfigDict) -> None:
    if config.train.steps <= 0:
        raise ValueError(f"train.steps must be positive, got {config.train.steps}")
    if config.train.nan_policy not in ("stop", "skip"):
        raise ValueError(
            f"train.nan_policy must be 'stop' or 'skip', got {config.train.nan_policy!r}"
        )
    accum = config.optim.grad_accum_steps
    if accum < 1 or config.data.global_batch_size % accum:
        raise ValueError(
            f"optim.grad_accum_steps={accum} must divide data.global_batch_size="
            f"{config.data.global_batch_size}"
        )
    if config.data.seq_len > config.model.max_seq_len:
        raise ValueError(
            f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len="
            f"{config.model.max_seq_len}"
        )


class Trainer:
    """Holds the compiled step and everything it needs; ``run()`` is the loop."""

    def __init__(self, config: ConfigDict, workdir: str, devices: list | None = None):
        _validate(config)
        self.config, self.workdir = config, workdir
        self.mesh = make_mesh(config.mesh, devices)
        self.rules = make_rules(config.mesh.rules)
        self.spec = ModelSpec(config.model)
        self.tx, self.schedule = make_optimizer(
            config.optim, config.train.steps, decay_mask(self.spec.axis_names)
        )
        self.task = get_task(config.train.task)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        param_sh = self.spec.shardings(self.mesh, self.rules)
        opt_shapes = jax.eval_shape(self.tx.init, self.spec.shapes)
        opt_sh = optax.tree_map_params(
            self.tx,
            lambda _, sh: sh,
            opt_shapes,
            param_sh,
            transform_non_params=lambda _: replicated,
        )
        self.state_shardings = {"params": param_sh, "opt_state": opt_sh, "step": replicated}
        self.state_shapes = {
            "params": self.spec.shapes,
            "opt_state": opt_shapes,
            "step": jax.ShapeDtypeStruct((), jnp.int32),
        }
        with use_mesh(self.mesh, self.rules):
            self.batch_sharding = logical_sharding(
                ("batch", "length"), (config.data.global_batch_size, config.data.seq_len)
            )
        self._step = jax.jit(
            self._train_step, out_shardings=(self.state_shardings, replicated), donate_argnums=0
        )

    # -- state -----------------------------------------------------------------------------
    def init_state(self) -> PyTree:
        params = self.spec.init(self.config.train.seed, self.mesh, self.rules)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"])
        return {"params": params, "opt_state": opt_state, "step": step}

    def abstract_state(self) -> PyTree:
        return abstract_arrays(self.state_shapes, self.state_shardings)

    # -- step ------------------------------------------------------------------------------
    def _loss_and_grads(self, params: PyTree, batch: dict):
        z_loss = float(self.config.train.z_loss)

        def loss_fn(p):
            total, weight, stats = self.task(self.spec.merge(p), batch, z_loss=z_loss)
            return total, (weight, stats)

        (total, (weight, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return total, weight, stats, grads

    def _train_step(self, state: PyTree, batch: dict) -> tuple[PyTree, dict]:
        with use_mesh(self.mesh, self.rules):
            params = state["params"]
            accum = self.config.optim.grad_accum_steps
            if accum == 1:
                total, weight, stats, grads = self._loss_and_grads(params, batch)
            else:
                micro = jax.tree.map(
                    lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch
                )

                def body(carry, mb):
                    out = self._loss_and_grads(params, mb)
                    return jax.tree.map(jnp.add, carry, out), None

                zero = jax.tree.map(
                    jnp.zeros_like,
                    jax.eval_shape(
                        self._loss_and_grads, params, jax.tree.map(lambda x: x[0], micro)
                    ),
                )
                (total, weight, stats, grads), _ = jax.lax.scan(body, zero, micro)
            denom = jnp.maximum(weight, 1.0)
            grads = jax.tree.map(lambda g: g / denom, grads)
            loss = total / denom
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = self.tx.update(grads, state["opt_state"], params)
            new_params = optax.apply_updates(params, updates)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            # A non-finite step is never applied: the parameters stay the last good ones.
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            new_state = {
                "params": keep(new_params, params),
                "opt_state": keep(opt_state, state["opt_state"]),
                "step": state["step"] + 1,
            }
            metrics = {
                "loss": loss,
                "nll": stats["nll_sum"] / denom,
                "accuracy": stats["correct"] / denom,
                "grad_norm": grad_norm,
                "learning_rate": self.schedule(state["step"]),
                "loss_tokens": weight,
                "finite": finite,
            }
            return new_state, metrics

    def grads(self, params: PyTree, batch: dict) -> tuple[jax.Array, PyTree]:
        """(mean loss, mean gradients) for a batch, without an update (for checks and tools)."""

        def fn(params, batch):
            with use_mesh(self.mesh, self.rules):
                total, weight, _, grads = self._loss_and_grads(params, batch)
            denom = jnp.maximum(weight, 1.0)
            return total / denom, jax.tree.map(lambda g: g / denom, grads)

        return jax.jit(fn)(params, batch)

    def device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assemble this process's rows into global arrays sharded over the batch axes."""
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in batch.items()
        }

    def step(self, state: PyTree, batch: dict) -> tuple[PyTree, dict]:
        return self._step(state, batch)

    # -- loop ------------------------------------------------------------------------------
    def run(self, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
        cfg = self.config
        os.makedirs(self.workdir, exist_ok=True)
        is_main = jax.process_index() == 0
        ckpt = Checkpointer(
            self.workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
        )
        tokenizer = get_tokenizer(cfg.data.tokenizer, base_dir=self.workdir)
        data = make_pipeline(
            cfg.data,
            tokenizer=tokenizer,
            global_batch_size=cfg.data.global_batch_size,
            seq_len=cfg.data.seq_len,
            split="train",
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            seed=cfg.data.seed,
        )
        resumed_from = ckpt.latest_step()
        if resumed_from is not None:
            _, state, data_state = ckpt.restore(resumed_from, self.abstract_state())
            if data_state:
                data.set_state(data_state)
        else:
            state = self.init_state()
        start = int(jax.device_get(state["step"]))
        if is_main:
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(cfg.to_json_best_effort(indent=2))
        writer = MetricsWriter(
            self.workdir, enabled=is_main, tensorboard=cfg.train.tensorboard, truncate_after=start
        )
        check_ids = tokenizer.vocab_size > cfg.model.vocab_size

        flops_per_step = flops_lib.train_flops_per_step(cfg)
        peak, peak_source = flops_lib.peak_flops_per_device()
        tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
        total = cfg.train.steps
        log_every = max(1, int(cfg.train.log_every))
        progress = _Progress(start, total, enabled=is_main and cfg.train.progress)
        if is_main:
            where = f"resuming from step {start}" if resumed_from is not None else "from scratch"
            progress.write(
                f"tessera: training {cfg.model.family} ({self.spec.num_params() / 1e6:.2f}M "
                f"params) on {self.mesh.devices.size} {jax.devices()[0].platform} devices, "
                f"mesh {dict(self.mesh.shape)}, {where}; workdir {self.workdir}"
            )

        stop = _StopFlag()
        pending: list[tuple[int, dict]] = []
        losses: dict[int, float] = {}
        last: dict[str, float] = {}
        t_mark, steps_since = None, 0
        step = start

        def flush() -> None:
            """Fetch buffered step metrics, stop on a non-finite loss, write a log row."""
            nonlocal t_mark, steps_since, last
            if not pending:
                return
            rows = jax.device_get([m for _, m in pending])
            steps = [s for s, _ in pending]
            pending.clear()
            for s, row in zip(steps, rows):
                losses[s] = float(row["loss"])
                if not bool(row["finite"]) and cfg.train.nan_policy == "stop":
                    good = ckpt.latest_step()
                    raise NonFiniteLossError(
                        f"non-finite loss at step {s} (loss={float(row['loss'])}, grad_norm="
                        f"{float(row['grad_norm'])}); stopped without saving, the last good "
                        f"checkpoint is step {good}. Set train.nan_policy=skip to skip such steps."
                    )
            now = time.perf_counter()
            row = {k: float(np.mean([r[k] for r in rows])) for k in rows[-1]}
            row["loss_last"] = float(rows[-1]["loss"])
            row["skipped_steps"] = int(sum(not bool(r["finite"]) for r in rows))
            if t_mark is not None and steps_since:
                dt = (now - t_mark) / steps_since
                row["step_time_s"] = dt
                row["tokens_per_s"] = tokens_per_step / dt
                row["tflops_per_device"] = flops_per_step / dt / self.mesh.devices.size / 1e12
                row["mfu"] = row["tflops_per_device"] * 1e12 / peak
            t_mark, steps_since = now, 0
            row.pop("finite")
            last = {"step": steps[-1], **row}
            writer.write(steps[-1], row)
            progress.log(steps[-1], row)

        try:
            with stop.installed():
                while step < total and not stop.requested:
                    batch = next(data)
                    if check_ids:
                        check_vocab(batch, cfg.model.vocab_size)
                    state, metrics = self.step(state, self.device_batch(batch))
                    step += 1
                    pending.append((step, metrics))
                    if t_mark is None:  # the first step compiles: time from its end
                        jax.block_until_ready(metrics)
                        flush()
                    else:
                        steps_since += 1
                    progress.update(step)
                    if step % log_every == 0 or step == total:
                        flush()
                    if on_step is not None:
                        on_step(step, metrics)
                    if step % cfg.checkpoint.every == 0 or step == total:
                        flush()
                        ckpt.save(step, state, data.get_state())
                if stop.requested:
                    flush()
                    ckpt.save(step, state, data.get_state())
                    progress.write(
                        f"tessera: {stop.name} received; saved checkpoint at step "
                        f"{step}. Re-run the same command to resume."
                    )
        finally:
            progress.close()
            ckpt.close()
            writer.close()
        if is_main and not stop.requested:
            loss = last.get("loss", float("nan"))
            note = ""
            if cfg.data.source == "synthetic":
                entropy = unigram_entropy(
                    tokenizer=tokenizer, seed=cfg.data.seed, tasks=cfg.data.synthetic_tasks or None
                )
                note = f" (the corpus's unigram entropy is {entropy:.4f} nats/token)"
            progress.write(
                f"tessera: finished {step} steps; loss {loss:.4f}{note}; MFU is against peak "
                f"FLOP/s from {peak_source}"
            )
        return TrainResult(
            step=step,
            losses=losses,
            last_metrics=last,
            interrupted=stop.requested,
            resumed_from=resumed_from,
        )


class _StopFlag:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint after the current step."""

    def __init__(self):
        self.requested, self.name = False, ""

    def _handle(self, signum, frame) -> None:
        self.requested, self.name = True, signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


class _Progress:
    """A tqdm bar on a terminal; one printed line per log step otherwise."""

    def __init__(self, start: int, total: int, enabled: bool):
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        parts = [
            f"loss {row['loss']:.4f}",
            f"lr {row['learning_rate']:.2e}",
            f"gnorm {row['grad_norm']:.3f}",
        ]
        if "tokens_per_s" in row:
            parts += [f"{row['tokens_per_s']:.0f} tok/s", f"MFU {100 * row['mfu']:.1f}%"]
        if self.bar is not None:
            self.bar.set_postfix_str(", ".join(parts))
        else:
            print(f"step {step}: " + ", ".join(parts), flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(
    config: ConfigDict,
    workdir: str,
    *,
    devices: list | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train ``config`` in ``workdir`` (resuming from its latest checkpoint)."""
    return Trainer(config, workdir, devices).run(on_step=on_step)
