"""Orbax checkpoints in ``WORKDIR/checkpoints``: train state (sharded arrays) + data position.

Restoring reads each array straight onto the target mesh's shardings, so a checkpoint written on
one mesh restores onto another. A checkpoint whose tensors do not fit the model is refused with
an error naming the first tensor that differs, before anything is loaded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

PyTree = Any


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Orbax warns at every read-only open and partial restore; keep CLI output clean."""
    old = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(old)


class CheckpointError(RuntimeError):
    """A missing or incompatible checkpoint."""


def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


class Checkpointer:
    """Save / restore ``{"state": train state, "data": iterator state}`` by step."""

    def __init__(
        self, workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False
    ):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(
                f"no checkpoint found in {self.directory} (has {workdir} been trained?)"
            )
        handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        with _quiet_orbax():
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, read_only=read_only,
                create=not read_only,
            )
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=handlers
            )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: PyTree, data_state: dict | None = None) -> None:
        """Save asynchronously (``close`` waits for it); a step already saved is skipped."""
        if step in self.manager.all_steps():
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                data=ocp.args.JsonSave(data_state or {}),
            ),
        )

    def check_compatible(self, step: int, target: PyTree) -> None:
        """Raise CheckpointError naming the first tensor whose presence or shape differs."""
        meta = self.manager.item_metadata(step)
        stored = meta["state"] if meta is not None and "state" in meta else None
        if stored is None or "params" not in stored:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} has no train state")
        # The parameters decide compatibility; optimizer state follows from them.
        stored, target = stored["params"], target["params"]
        stored_flat = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
        target_flat = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(target)[0]}
        for name, want in target_flat.items():
            if name not in stored_flat:
                raise CheckpointError(
                    f"incompatible checkpoint {self.directory} step {step}: tensor {name} is "
                    "missing (was it written by another model config?)"
                )
            got = tuple(getattr(stored_flat[name], "shape", ()))
            if got != tuple(want.shape):
                raise CheckpointError(
                    f"incompatible checkpoint {self.directory} step {step}: tensor {name} has "
                    f"shape {got}, the model expects {tuple(want.shape)}"
                )
        extra = sorted(set(stored_flat) - set(target_flat))
        if extra:
            raise CheckpointError(
                f"incompatible checkpoint {self.directory} step {step}: unexpected tensor "
                f"{extra[0]} (was it written by another model config?)"
            )

    def resolve_step(self, step: int | None) -> int:
        """``step`` if it was saved, else the latest when ``step`` is None; errors name the dir."""
        steps = sorted(self.all_steps())
        if step is None:
            if not steps:
                raise CheckpointError(f"no checkpoint found in {self.directory}")
            return steps[-1]
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory} (have {steps})"
            )
        return step

    def restore(self, step: int | None, target: PyTree) -> tuple[int, PyTree, dict]:
        """Restore ``step`` (default latest) onto the shardings of ``target`` (abstract arrays)."""
        step = self.resolve_step(step)
        self.check_compatible(step, target)
        differ = sorted(set(target) ^ set(self.manager.item_metadata(step)["state"]))
        if differ:
            key = differ[0]
            has = "has no" if key in target else "has an unexpected"
            raise CheckpointError(
                f"incompatible checkpoint {self.directory} step {step}: it {has} {key!r} state "
                "(was it written with other train settings, such as train.ema_decay?)"
            )
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
                ),
                data=ocp.args.JsonRestore(),
            ),
        )
        return step, out["state"], dict(out["data"] or {})

    def restore_params(self, step: int | None, target: PyTree) -> tuple[int, PyTree]:
        """Only the parameters (no optimizer state is read) onto the shardings of ``target``."""
        step = self.resolve_step(step)
        self.check_compatible(step, {"params": target})
        item = {"params": target}
        with _quiet_orbax():
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=item,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                        partial_restore=True,
                    )
                ),
            )
        return step, out["state"]["params"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_params(workdir: str, target: PyTree, step: int | None = None) -> tuple[int, PyTree]:
    """(step, params) of ``workdir``'s checkpoint ``step`` (default: the latest), read-only, each
    array placed on the sharding of ``target`` (abstract arrays); no optimizer state is read."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        return ckpt.restore_params(step, target)
    finally:
        ckpt.close()
