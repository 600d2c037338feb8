"""The one train loop shared by every family and task.

``train(config, workdir)`` builds the mesh, the model (parameters created sharded), the optimizer
and the task (``train.task``: its data pipeline, batch layout, loss, metrics, FLOPs and extra
state such as an EMA); resumes from the latest checkpoint in ``workdir`` if there is one; runs
jitted steps, each with an RNG folded from ``train.seed`` and the step (parameters a mixer
updates by rule, such as the MoE router bias, are masked out of the optimizer and set after its
update from the step's aux statistics: ``models/updates.py``); evaluates every
``eval.every`` steps and at the end; logs to the console, ``metrics.jsonl`` and TensorBoard;
saves checkpoints every ``checkpoint.every`` steps, at the end, and on SIGTERM / SIGINT (with
several processes, a signal reaching any one makes all of them save the same step: ``_StopFlag``
below). It holds
the workdir's lock while it runs and keeps the history of the configs it was (re)started with
(``train/workdir.py``). Nothing here is specific to a task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from tessera import distributed
from tessera.configs.base import ConfigDict
from tessera.models.create import ModelSpec, abstract_arrays
from tessera.models.updates import apply_rule_updates, rule_mask, stat_depths
from tessera.sharding import logical_sharding, make_mesh, make_rules, use_mesh
from tessera.train import flops as flops_lib
from tessera.train.checkpoints import Checkpointer
from tessera.train.metrics import MetricsWriter, flatten_metrics
from tessera.train.optimizers import decay_mask, make_optimizer
from tessera.train.progress import Progress
from tessera.train.rng import eval_rng, step_rng
from tessera.train.tasks import get_task
from tessera.train.tasks.base import AUX_PREFIX
from tessera.train.workdir import config_changes, hold_workdir, save_config

PyTree = Any


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf and ``train.nan_policy`` is ``stop``."""


@dataclasses.dataclass
class TrainResult:
    step: int  # last completed step
    losses: dict[int, float]  # per step, for the steps this run executed
    last_metrics: dict[str, float]  # the last train row
    stop_signal: int = 0  # the signal (SIGTERM, SIGINT) that interrupted the run; 0: none
    resumed_from: int | None = None
    evals: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)  # eval rows

    @property
    def interrupted(self) -> bool:
        return self.stop_signal != 0


# Train metrics the Trainer computes itself; a task's metrics may not use these names.
_TRAINER_METRICS = ("loss", "grad_norm", "learning_rate", "loss_weight", "finite")


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
    if config.eval.every < 0:
        raise ValueError(f"eval.every must be >= 0 (0: never), got {config.eval.every}")
    if config.eval.every and config.eval.batches < 1:
        raise ValueError(f"eval.batches must be positive, got {config.eval.batches}")


class Trainer:
    """Holds the compiled step and everything it needs; ``run()`` is the loop.

    The train state is ``{"params", "opt_state", "step"}`` plus the task's parameter-shaped
    states by name (``"ema"``), sharded like the parameters.
    """

    def __init__(self, config: ConfigDict, workdir: str, devices: list | None = None):
        _validate(config)
        self.config, self.workdir = config, workdir
        self.task = get_task(config, workdir)
        self.mesh = make_mesh(config.mesh, devices)
        self.rules = make_rules(config.mesh.rules)
        self.spec = ModelSpec(config.model)
        # Parameters set by a rule after each step (MoE router bias), not by the optimizer.
        self.rule_targets = self.spec.rule_targets
        self.tx, self.schedule = make_optimizer(
            config.optim,
            config.train.steps,
            decay_mask(self.spec.axis_names),
            frozen=rule_mask(self.rule_targets, self.spec.shapes) if self.rule_targets else None,
        )
        self.param_states = self.task.param_states()
        replicated = NamedSharding(self.mesh, PartitionSpec())
        param_sh = self.spec.shardings(self.mesh, self.rules, strict=bool(config.mesh.strict))
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
        for name in self.param_states:
            self.state_shardings[name] = param_sh
            self.state_shapes[name] = self.spec.shapes
        batch = config.data.global_batch_size
        self.features = self.task.features()
        with use_mesh(self.mesh, self.rules):
            self.batch_shardings = {
                k: logical_sharding(f.axes, (batch, *f.shape)) for k, f in self.features.items()
            }
        per_example = self.task.flops_per_example()
        # FLOPs of one optimizer step on all devices (forward + backward = 3x forward); None:
        # the model cannot count them.
        self.flops_per_step = None if per_example is None else 3.0 * per_example * batch
        unit, per_example = self.task.throughput_unit()
        self.throughput = (unit, per_example * batch)  # (unit, units per step)
        self._step = jax.jit(
            self._train_step, out_shardings=(self.state_shardings, replicated), donate_argnums=0
        )
        self._eval_step = jax.jit(self._eval_batch, out_shardings=replicated)
        self._depths: dict[str, list[int]] = {}

    # -- state -----------------------------------------------------------------------------
    def init_state(self) -> PyTree:
        params = self.spec.init(self.config.train.seed, self.mesh, self.rules)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"])
        state = {"params": params, "opt_state": opt_state, "step": step}
        for name, extra in self.param_states.items():
            state[name] = jax.jit(extra.init, out_shardings=self.state_shardings[name])(params)
        return state

    def abstract_state(self) -> PyTree:
        """The train state as shape/dtype/sharding structs (allocates nothing)."""
        return abstract_arrays(self.state_shapes, self.state_shardings)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """One global batch as shape/dtype/sharding structs, by the task's feature names."""
        batch = self.config.data.global_batch_size
        return {
            k: jax.ShapeDtypeStruct((batch, *f.shape), f.dtype, sharding=self.batch_shardings[k])
            for k, f in self.features.items()
        }

    def lower(self) -> jax.stages.Lowered:
        """The train step lowered for this Trainer's mesh with the real state and batch
        shardings, from abstract inputs: ``.compile()`` it for ``memory_analysis()`` and
        ``cost_analysis()``, also for devices this machine does not have (``tessera.aot``)."""
        return self._step.lower(self.abstract_state(), self.abstract_batch())

    # -- step ------------------------------------------------------------------------------
    def _loss_and_grads(self, params: PyTree, batch: dict, rng: jax.Array):
        def loss_fn(p):
            total, weight, sums = self.task.loss(self.spec.merge(p), batch, rng)
            return total, (weight, sums)

        (total, (weight, sums)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return total, weight, sums, grads

    def _accumulated(self, params: PyTree, batch: dict, step: jax.Array):
        """(loss sum, weight, metric sums, gradient sums) over ``optim.grad_accum_steps``
        micro-batches, each with its own RNG."""
        seed, accum = self.config.train.seed, self.config.optim.grad_accum_steps
        if accum == 1:
            return self._loss_and_grads(params, batch, step_rng(seed, step))
        micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

        def body(carry, xs):
            mb, i = xs
            out = self._loss_and_grads(params, mb, step_rng(seed, step, i))
            return jax.tree.map(jnp.add, carry, out), None

        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(self._loss_and_grads, params, first, step_rng(seed, step, 0))
        zero = jax.tree.map(jnp.zeros_like, shapes)
        out, _ = jax.lax.scan(body, zero, (micro, jnp.arange(accum)))
        return out

    def _train_step(self, state: PyTree, batch: dict) -> tuple[PyTree, dict]:
        with use_mesh(self.mesh, self.rules):
            params = state["params"]
            total, weight, sums, grads = self._accumulated(params, batch, state["step"] + 1)
            denom = jnp.maximum(weight, 1.0)
            # In each parameter's dtype: a float32 quotient would turn bf16 parameters' Adam
            # moments float32 after the first step (and then no longer alias the donated state).
            grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
            loss = total / denom
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = self.tx.update(grads, state["opt_state"], params)
            new_params = optax.apply_updates(params, updates)
            task_metrics = self.task.metrics(sums, denom)
            if self.rule_targets:  # after the optimizer's (zero) update of those parameters
                new_params = apply_rule_updates(
                    self.rule_targets, new_params, self._rule_stats(task_metrics)
                )
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            # A non-finite step is never applied: the parameters stay the last good ones.
            # Every leaf keeps its dtype from step to step (so the donated state is updated in
            # place and the step does not retrace).
            keep = lambda new, old: jax.tree.map(
                lambda n, o: jnp.where(finite, n.astype(o.dtype), o), new, old
            )
            new_state = {
                "params": keep(new_params, params),
                "opt_state": keep(opt_state, state["opt_state"]),
                "step": state["step"] + 1,
            }
            for name, extra in self.param_states.items():
                new_state[name] = keep(extra.update(state[name], new_params), state[name])
            clash = set(task_metrics) & set(_TRAINER_METRICS)
            if clash:
                raise ValueError(
                    f"task {self.task.name} reports metrics {sorted(clash)}, which the trainer "
                    "logs itself"
                )
            metrics = {
                "loss": loss,
                **task_metrics,
                "grad_norm": grad_norm,
                "learning_rate": self.schedule(state["step"]),
                "loss_weight": weight,
                "finite": finite,
            }
            return new_state, metrics

    def _rule_stats(self, metrics: dict) -> dict[str, jax.Array]:
        """The statistics the rule updates read, from the task's metrics (``aux/<key>``, weighted
        means over the step's micro-batches)."""
        stats = {}
        for target in self.rule_targets:
            key = f"{AUX_PREFIX}{target.update.stat}"
            if key not in metrics:
                raise ValueError(
                    f"parameter {'/'.join(map(str, target.path))} is updated from the model's aux "
                    f"statistic {target.update.stat!r}, which task {self.task.name} does not "
                    "report (tasks report model aux through add_aux_losses)"
                )
            stats[target.update.stat] = metrics[key]
        return stats

    def stat_depths(self, key: str) -> list[int]:
        """The layer (depth) of each row of the per-layer metric ``key`` (``aux/<stat>``)."""
        if not key.startswith(AUX_PREFIX):
            raise ValueError(f"task {self.task.name} reports metric {key!r} that is not a scalar")
        if key not in self._depths:
            self._depths[key] = stat_depths(self.config.model, key[len(AUX_PREFIX):])
        return self._depths[key]

    def flat_metrics(self, row: dict) -> dict[str, float]:
        """A fetched metrics row as floats, per-layer statistics one value per layer."""
        return flatten_metrics(row, self.stat_depths)

    def _eval_batch(self, params: PyTree, batch: dict, index: jax.Array):
        with use_mesh(self.mesh, self.rules):
            seed = self.config.train.seed
            return self.task.loss(
                self.spec.merge(params), batch, eval_rng(seed, index), train=False
            )

    def grads(self, params: PyTree, batch: dict, step: int = 1) -> tuple[jax.Array, PyTree]:
        """(mean loss, mean gradients) of train step ``step`` on a batch, without an update (for
        checks and tools)."""

        def fn(params, batch):
            with use_mesh(self.mesh, self.rules):
                total, weight, _, grads = self._accumulated(params, batch, jnp.int32(step))
            denom = jnp.maximum(weight, 1.0)
            return total / denom, jax.tree.map(lambda g: g / denom, grads)

        return jax.jit(fn)(params, batch)

    def device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assemble this process's rows into global arrays sharded by the task's feature axes."""
        if set(batch) != set(self.features):
            raise ValueError(
                f"task {self.task.name}: the pipeline yields batch keys {sorted(batch)}, its "
                f"features are {sorted(self.features)}"
            )
        out = {}
        for key, value in batch.items():
            feature = self.features[key]
            if value.shape[1:] != feature.shape or value.dtype != np.dtype(feature.dtype):
                raise ValueError(
                    f"task {self.task.name}: batch key {key!r} is {value.dtype} "
                    f"{list(value.shape)}, its feature is {feature.dtype} [batch, *{feature.shape}]"
                )
            out[key] = jax.make_array_from_process_local_data(self.batch_shardings[key], value)
        return out

    def step(self, state: PyTree, batch: dict) -> tuple[PyTree, dict]:
        return self._step(state, batch)

    def evaluate(self, state: PyTree) -> dict[str, float]:
        """Held-out metrics over the first ``eval.batches`` batches of the task's eval split (a
        fresh iterator: the same batches every time): ``eval/loss`` and ``eval/<metric>`` of the
        parameters, ``eval_<name>/...`` of each parameter-shaped state (the EMA), and
        ``eval/<name>`` of the task's ``extra_eval`` (of the parameters)."""
        trees = {"eval": state["params"], **{f"eval_{n}": state[n] for n in self.param_states}}
        data = self.task.make_data(
            "eval", process_index=jax.process_index(), process_count=jax.process_count()
        )
        results: dict[str, list] = {prefix: [] for prefix in trees}
        for i, batch in zip(range(self.config.eval.batches), self._eval_batches(data)):
            batch = self.device_batch(batch)
            for prefix, params in trees.items():
                results[prefix].append(self._eval_step(params, batch, np.int32(i)))
        row = {}
        for prefix, outs in jax.device_get(results).items():
            total = sum(float(t) for t, _, _ in outs)
            denom = max(sum(float(w) for _, w, _ in outs), 1.0)
            sums = {k: sum(np.asarray(s[k], np.float64) for _, _, s in outs) for k in outs[0][2]}
            row[f"{prefix}/loss"] = total / denom
            for k, v in self.flat_metrics(self.task.eval_metrics(sums, denom)).items():
                row[f"{prefix}/{k}"] = v
        for k, v in self.task.extra_eval(state["params"], self).items():
            row[f"eval/{k}"] = float(v)
        return row

    @staticmethod
    def _eval_batches(data: Any) -> Iterator[dict]:
        """The eval iterator's batches, until it ends on every process: with several processes,
        one whose split ended first feeds the pipeline's zero-weight padding batch while any other
        still has data (so all run the same number of eval steps). A pipeline without a padding
        batch ends where it ends."""
        padding = getattr(data, "padding", lambda: None)()
        if jax.process_count() == 1 or padding is None:
            yield from data
            return
        it = iter(data)
        while True:
            batch = next(it, None)
            if not distributed.any_process(batch is not None):
                return
            yield padding if batch is None else batch

    # -- loop ------------------------------------------------------------------------------
    def run(self, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
        """Train to ``train.steps`` holding the workdir's lock (``WorkdirHeldError`` if another
        trainer holds it); a run already at ``train.steps`` does nothing."""
        os.makedirs(self.workdir, exist_ok=True)
        is_main = jax.process_index() == 0
        with hold_workdir(self.workdir, enabled=is_main, note=self._note):
            return self._run(on_step)

    def _note(self, text: str) -> None:
        """A console line from process 0 (unless ``train.progress`` is off)."""
        if jax.process_index() == 0 and self.config.train.progress:
            print(text, flush=True)

    def _run(self, on_step: Callable[[int, dict], None] | None) -> TrainResult:
        cfg = self.config
        is_main = jax.process_index() == 0
        ckpt = Checkpointer(
            self.workdir,
            directory=cfg.checkpoint.directory or None,
            keep=cfg.checkpoint.keep,
            async_save=cfg.checkpoint.async_save,
        )
        data = self.task.make_data(
            "train", process_index=jax.process_index(), process_count=jax.process_count()
        )
        restored = ckpt.restore_intact(self.abstract_state(), warn=is_main)
        if restored is not None:
            resumed_from, state, data_state = restored
            if data_state:
                data.set_state(data_state)
        else:
            resumed_from, state = None, self.init_state()
        start = int(jax.device_get(state["step"]))
        if start >= cfg.train.steps:
            ckpt.close()
            past = f" (past train.steps={cfg.train.steps})" if start > cfg.train.steps else ""
            self._note(f"tessera: already finished at step {start}{past}; nothing to do")
            return TrainResult(step=start, losses={}, last_metrics={}, resumed_from=resumed_from)
        if is_main:
            config_json = cfg.to_json_best_effort(indent=2)
            changes = config_changes(self.workdir, config_json) if resumed_from is not None else []
            if changes:
                self._note("tessera: resuming with changed config: " + ", ".join(changes))
            save_config(self.workdir, config_json, start)
        writer = MetricsWriter(
            self.workdir, enabled=is_main, tensorboard=cfg.train.tensorboard, truncate_after=start
        )

        peak, peak_source = flops_lib.peak_flops_per_device()
        unit, units_per_step = self.throughput
        total = cfg.train.steps
        log_every = max(1, int(cfg.train.log_every))
        eval_every = int(cfg.eval.every)
        progress = Progress(start, total, unit, enabled=is_main and cfg.train.progress)
        if is_main:
            where = f"resuming from step {start}" if resumed_from is not None else "from scratch"
            progress.write(
                f"tessera: training {cfg.model.family} ({self.spec.num_params() / 1e6:.2f}M "
                f"params, task {self.task.name}) on {self.mesh.devices.size} "
                f"{jax.devices()[0].platform} devices, mesh {dict(self.mesh.shape)}, {where}; "
                f"workdir {self.workdir}"
            )

        stop = _StopFlag(synced=jax.process_count() > 1)
        pending: list[tuple[int, dict]] = []
        losses: dict[int, float] = {}
        evals: dict[int, dict[str, float]] = {}
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
            flat = [self.flat_metrics(r) for r in rows]
            row = {k: float(np.mean([r[k] for r in flat])) for k in flat[-1]}
            row["loss_last"] = float(rows[-1]["loss"])
            row["skipped_steps"] = int(sum(not bool(r["finite"]) for r in rows))
            if t_mark is not None and steps_since:
                dt = (now - t_mark) / steps_since
                row["step_time_s"] = dt
                row[f"{unit}_per_s"] = units_per_step / dt
                if self.flops_per_step is not None:
                    tflops = self.flops_per_step / dt / self.mesh.devices.size / 1e12
                    row["tflops_per_device"] = tflops
                    row["mfu"] = tflops * 1e12 / peak
            t_mark, steps_since = now, 0
            row.pop("finite")
            last = {"step": steps[-1], **row}
            writer.write(steps[-1], row)
            progress.log(steps[-1], row)

        def evaluate() -> None:
            """An eval row for ``step``; its time is kept out of the next ``step_time_s``."""
            nonlocal t_mark
            flush()
            evals[step] = row = self.evaluate(state)
            writer.write_eval(step, row)
            progress.log_eval(step, row)
            t_mark = time.perf_counter()

        try:
            with stop.installed():
                while step < total and not stop.requested:
                    state, metrics = self.step(state, self.device_batch(next(data)))
                    step += 1
                    pending.append((step, metrics))
                    if t_mark is None:  # the first step compiles: time from its end
                        jax.block_until_ready(metrics)
                        flush()
                    else:
                        steps_since += 1
                    progress.update(step)
                    stop.check(step)
                    if step % log_every == 0 or step == total:
                        flush()
                    if on_step is not None:
                        on_step(step, metrics)
                    if eval_every and (step % eval_every == 0 or step == total):
                        evaluate()
                    if step % cfg.checkpoint.every == 0 or step == total:
                        flush()
                        ckpt.save(step, state, data.get_state())
                if stop.requested:
                    flush()
                    ckpt.save(step, state, data.get_state())
                    where = (
                        f" by a process of this run; all {jax.process_count()} processes"
                        if stop.synced else ";"
                    )
                    progress.write(
                        f"tessera: {stop.name} received{where} saved checkpoint at step "
                        f"{step}. Re-run the same command to resume."
                    )
        finally:
            progress.close()
            ckpt.close()
            writer.close()
        if is_main and not stop.requested:
            parts = [f"loss {last.get('loss', float('nan')):.4f}"]
            if step in evals:
                parts.append(f"eval/loss {evals[step]['eval/loss']:.4f}")
            note = self.task.summary()
            if note:
                parts.append(note)
            if self.flops_per_step is None:
                parts.append("no FLOP count for this model, so no MFU")
            else:
                parts.append(f"MFU is against peak FLOP/s from {peak_source}")
            progress.write(f"tessera: finished {step} steps; " + "; ".join(parts))
        return TrainResult(
            step=step,
            losses=losses,
            last_metrics=last,
            stop_signal=stop.signum,
            resumed_from=resumed_from,
            evals=evals,
        )


class _StopFlag:
    """SIGTERM / SIGINT stop the loop after a step, which is then saved.

    One process: the handler sets the flag. Several processes (``synced``) must all save the same
    step, though the signal may reach only one of them (a maintenance event on one TPU host):
    SIGTERM is left to jax's preemption service (``jax.distributed`` registers it), which tells
    every process, and ``check(step)`` asks it at every step whether this is the step all agreed
    to stop at (``multihost_utils.reached_preemption_sync_point``); a SIGINT is turned into a
    SIGTERM to this process so it takes the same path.
    """

    def __init__(self, synced: bool = False):
        self.synced = synced
        self.signum = 0  # the signal that stops the loop; 0: none (yet)
        self._received = 0  # the signal this process received

    @property
    def requested(self) -> bool:
        return self.signum != 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def _handle(self, signum, frame) -> None:
        if not self.synced:
            self.signum = signum
            return
        self._received = self._received or signum
        signal.raise_signal(signal.SIGTERM)  # to the preemption service's handler

    def check(self, step: int) -> None:
        """Synced: stop at ``step`` if every process reached the agreed preemption step."""
        if self.synced and not self.signum:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = self._received or signal.SIGTERM

    @contextlib.contextmanager
    def installed(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT,) if self.synced else (signal.SIGTERM, signal.SIGINT)
        old = {s: signal.signal(s, self._handle) for s in signals}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def train(
    config: ConfigDict,
    workdir: str,
    *,
    devices: list | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train ``config`` in ``workdir`` (resuming from its latest checkpoint)."""
    return Trainer(config, workdir, devices).run(on_step=on_step)
