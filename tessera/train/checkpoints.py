"""Orbax checkpoints in ``WORKDIR/checkpoints`` (or ``checkpoint.directory``, which may be a
``gs://`` path): train state (sharded arrays) + each process's data position.

Restoring reads each array straight onto the target mesh's shardings, so a checkpoint written on
one mesh (or by another number of processes) restores onto another. A checkpoint whose tensors do
not fit the model is refused with an error naming the first tensor that differs, before anything
is loaded. Every process writes its own shards of the state and its data iterator's position
(``<step>/data_by_process/process_<i>-of-<n>.json``, grain's checkpoint handler); a run with
another number of processes is handed every process's position, and the LM pipeline takes its
own streams' positions from them (other pipelines restart their input, with a note).

Saving is asynchronous: ``save`` returns once the arrays are copied off the devices and orbax
writes them in a background thread while training goes on.

Integrity: orbax/TensorStore checksum only the shard index (crc32c), not the array bytes, so once a
step is committed, a background thread of process 0 writes ``<step>/tessera_manifest.json``: the
size and sha256 of every file under the step (local directories only; object stores such as GCS
checksum each object themselves). Restore checks the manifest first and names the first missing,
truncated or changed file. A step without a manifest (killed between commit and manifest, or
written by an older tessera) is verified by loading: any error while reading it marks it damaged.
Either way a damaged step raises ``DamagedCheckpointError``; ``restore_intact`` then falls back to
the newest intact step and moves the damaged ones to ``checkpoints/damaged/<step>`` (nothing is
deleted or modified).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from tessera.files import write_atomic

PyTree = Any

MANIFEST = "tessera_manifest.json"
DAMAGED = "damaged"
DATA_ITEM = "data_by_process"  # each process's data iterator state (grain's handler)
LEGACY_DATA_ITEM = "data"  # one JSON state, written by tessera before multi-process resume


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


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files are missing, truncated, changed or unreadable."""

    def __init__(self, directory: str, step: int, reason: str, hint: str = ""):
        super().__init__(f"checkpoint step {step} in {directory} is damaged ({reason}){hint}")
        self.step, self.reason = step, reason


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: str) -> list[str]:
    """Paths of the files under ``root``, relative to it, sorted; the manifest itself excluded."""
    out = []
    for dirpath, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, n), root) for n in names]
    return sorted(f for f in out if f != MANIFEST)


def write_manifest(step_dir: str) -> None:
    """Record size and sha256 of every file under a finalised ``step_dir`` (written atomically)."""
    files = {
        rel: {"size": os.path.getsize(os.path.join(step_dir, rel)),
              "sha256": _sha256(os.path.join(step_dir, rel))}
        for rel in _files(step_dir)
    }
    write_atomic(
        os.path.join(step_dir, MANIFEST), json.dumps({"version": 1, "files": files}, indent=1)
    )


def verify_manifest(step_dir: str) -> str | None:
    """The first problem found against ``step_dir``'s manifest as ``FILE: what``, None if every
    file matches; raises FileNotFoundError if the step has no manifest."""
    with open(os.path.join(step_dir, MANIFEST)) as f:
        try:
            files = json.load(f)["files"]
        except (ValueError, KeyError, TypeError):
            return f"{MANIFEST}: unreadable"
    for rel, want in files.items():
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            return f"{rel}: missing"
        size = os.path.getsize(path)
        if size != want["size"]:
            return f"{rel}: {size} bytes, {want['size']} when saved"
        if _sha256(path) != want["sha256"]:
            return f"{rel}: sha256 mismatch"
    return None


def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


class _Snapshot:
    """A data iterator's state captured when its step is saved, in the form grain's checkpoint
    handler writes (the handler may run after the iterator has moved on)."""

    def __init__(self, state: dict):
        self._json = json.dumps(state, indent=1).encode()

    def get_state(self) -> bytes:
        return self._json


def is_local(directory: str) -> bool:
    """A path on this machine's filesystem (not ``gs://...`` or another URL scheme)."""
    return "://" not in directory


class Checkpointer:
    """Save / restore the train state and each process's data iterator state by step, in
    ``WORKDIR/checkpoints`` or ``directory`` (a local path or ``gs://...``)."""

    def __init__(
        self,
        workdir: str,
        *,
        directory: str | None = None,
        keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        directory = directory or os.path.join(workdir, "checkpoints")
        self.local = is_local(directory)
        self.directory = os.path.abspath(directory) if self.local else directory.rstrip("/")
        if read_only and not epath.Path(self.directory).is_dir():
            raise CheckpointError(
                f"no checkpoint found in {self.directory} (has {workdir} been trained?)"
            )
        handlers = {
            "state": ocp.PyTreeCheckpointHandler(),
            DATA_ITEM: grain.checkpoint.CheckpointHandler(),
            LEGACY_DATA_ITEM: ocp.JsonCheckpointHandler(),
        }
        with _quiet_orbax():
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, read_only=read_only,
                create=not read_only,
            )
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=handlers
            )
        self._async = async_save
        # Process 0, local directories: a thread writes the manifest of each step once orbax has
        # committed it, off the training loop.
        self._sealing: threading.Thread | None = None
        self._committed = threading.Event()  # set when no save is in flight any more

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: PyTree, data_state: dict | None = None) -> None:
        """Save ``state`` and this process's ``data_state``; returns while orbax writes in the
        background (``close`` waits). A step already saved is skipped."""
        if step in self.manager.all_steps():
            return
        self._join_sealing()
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                **{DATA_ITEM: grain.checkpoint.CheckpointSave(_Snapshot(data_state or {}))},
            ),
        )
        if self.local and jax.process_index() == 0:
            if not self._async:
                write_manifest(self._step_dir(step))
                return
            self._committed.clear()
            self._sealing = threading.Thread(
                target=self._seal_when_committed, args=(step,), daemon=True,
                name=f"tessera-manifest-{step}",
            )
            self._sealing.start()

    def _seal_when_committed(self, step: int) -> None:
        """Write ``step``'s manifest once orbax has renamed it into place (it does so after all
        its files are written); give up if the save ended without it (an error, reported by
        orbax to the caller)."""
        step_dir = self._step_dir(step)
        while not os.path.isdir(step_dir):
            if self._committed.wait(0.05) and not os.path.isdir(step_dir):
                return
        try:
            write_manifest(step_dir)
        except OSError as e:  # the step stays verifiable by loading
            print(f"tessera: could not write {MANIFEST} for step {step}: {e}", file=sys.stderr)

    def _join_sealing(self) -> None:
        """Wait for the save in flight and its manifest."""
        if self._sealing is None:
            return
        self.manager.wait_until_finished()
        self._committed.set()
        self._sealing.join()
        self._sealing = None

    def check_compatible(self, step: int, target: PyTree, *, partial: bool = False) -> None:
        """Raise CheckpointError naming the first tensor whose presence or shape differs, then
        (unless ``partial``: a restore of some entries only) the first state entry (``ema``, ...)
        that only one of the checkpoint and ``target`` has."""
        meta = self.manager.item_metadata(step)
        state = meta["state"] if meta is not None and "state" in meta else None
        if state is None or "params" not in state:
            raise DamagedCheckpointError(self.directory, step, "its train state has no metadata")
        # The parameters decide compatibility; optimizer state follows from them.
        stored, params = state["params"], target["params"]
        stored_flat = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
        target_flat = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
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
        differ = [] if partial else sorted(set(target) ^ set(state))
        if differ:
            key = differ[0]
            has = "has no" if key in target else "has an unexpected"
            raise CheckpointError(
                f"incompatible checkpoint {self.directory} step {step}: it {has} {key!r} state "
                "(was it written with other train settings, such as train.ema_decay?)"
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

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    @contextlib.contextmanager
    def _verified(self, step: int) -> Iterator[None]:
        """Check ``step`` against its manifest, then run the read; without a manifest, any error
        but an incompatibility while reading means the step is damaged."""
        where = os.path.join(os.path.basename(self.directory), str(step))
        try:
            if not self.local:
                raise FileNotFoundError  # no manifests on object stores
            problem, sealed = verify_manifest(self._step_dir(step)), True
        except FileNotFoundError:
            problem, sealed = None, False
        if problem is not None:
            raise DamagedCheckpointError(self.directory, step, f"{where}/{problem}")
        try:
            yield
        except CheckpointError:
            raise
        except Exception as e:  # TensorStore/orbax errors on a step no manifest vouches for
            if sealed:
                raise
            first = (str(e).splitlines() or [type(e).__name__])[0][:160]
            raise DamagedCheckpointError(
                self.directory, step, f"{where} is unreadable and has no {MANIFEST}: {first}"
            ) from None

    def restore(self, step: int | None, target: PyTree) -> tuple[int, PyTree, dict]:
        """Restore ``step`` (default latest) onto the shardings of ``target`` (abstract arrays);
        DamagedCheckpointError if its files fail verification."""
        step = self.resolve_step(step)
        with self._verified(step):
            return self._restore(step, target)

    def restore_intact(self, target: PyTree, warn: bool = True) -> tuple[int, PyTree, dict] | None:
        """Restore the newest intact step (None if there is none saved). Newer damaged steps are
        moved to ``checkpoints/damaged/<step>`` so the step numbers can be saved again, each
        reported in one line on stderr if ``warn``; if every step is damaged, CheckpointError and
        nothing is moved."""
        damaged: list[DamagedCheckpointError] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                restored = self.restore(step, target)
            except DamagedCheckpointError as e:
                damaged.append(e)
                continue
            for e in damaged:
                moved = self._move_aside(e.step)
                if warn:
                    print(f"tessera: {e}; moved it to {moved}; resuming from step {step}",
                          file=sys.stderr, flush=True)
            return restored
        if damaged:
            raise CheckpointError(
                f"no intact checkpoint in {self.directory}: "
                + "; ".join(f"step {e.step} is damaged ({e.reason})" for e in damaged)
            )
        return None

    def _move_aside(self, step: int) -> str:
        """Move a damaged step to ``damaged/<step>`` (``<step>.1``, … if taken); return where."""
        base = epath.Path(self.directory) / DAMAGED / str(step)
        dest, n = base, 0
        while dest.exists():
            n += 1
            dest = base.with_name(f"{step}.{n}")
        if jax.process_index() == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
            epath.Path(self._step_dir(step)).rename(dest)
        self.manager.reload()
        return f"{os.path.basename(self.directory)}/{DAMAGED}/{dest.name}"

    def _restore(self, step: int, target: PyTree) -> tuple[int, PyTree, dict]:
        self.check_compatible(step, target)
        items = {
            "state": ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
            )
        }
        legacy = epath.Path(self._step_dir(step)) / LEGACY_DATA_ITEM
        if legacy.exists() and not (epath.Path(self._step_dir(step)) / DATA_ITEM).exists():
            items[LEGACY_DATA_ITEM] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        if LEGACY_DATA_ITEM in items:
            return step, out["state"], dict(out[LEGACY_DATA_ITEM] or {})
        return step, out["state"], self._data_state(step)

    def _data_state(self, step: int) -> dict:
        """This process's data iterator state saved at ``step``. When the step was saved by
        another number of processes, ``{"saved_by_processes": [state of each]}``, from which a
        stream pipeline takes the positions of its own streams (``DataIterator.set_state``);
        {} (with a note from process 0) when it saved none or an incomplete set."""
        saved = epath.Path(self._step_dir(step)) / DATA_ITEM
        index, count = jax.process_index(), jax.process_count()
        mine = saved / f"process_{index}-of-{count}.json"
        if mine.exists():
            return json.loads(mine.read_text())
        others = sorted(p.name for p in saved.glob("process_*-of-*.json")) if saved.exists() else []
        counts = {name.split("-of-")[1].removesuffix(".json") for name in others}
        if len(counts) == 1 and (n := int(counts.pop())) > 0:
            files = [saved / f"process_{i}-of-{n}.json" for i in range(n)]
            if all(f.exists() for f in files):
                return {"saved_by_processes": [json.loads(f.read_text()) for f in files]}
        if others and index == 0:
            print(
                f"tessera: checkpoint step {step} holds the data positions of "
                f"{others[0].split('-of-')[1].removesuffix('.json')} processes and this run has "
                f"{count}; the model and optimizer resume, the input restarts from its beginning",
                file=sys.stderr, flush=True,
            )
        return {}

    def restore_params(
        self, step: int | None, target: PyTree, key: str = "params"
    ) -> tuple[int, PyTree]:
        """Only the parameters (no optimizer state is read) onto the shardings of ``target``;
        ``key`` names another parameter-shaped entry of the state instead (``"ema"``)."""
        step = self.resolve_step(step)
        item = {key: target}
        with self._verified(step), _quiet_orbax():
            self.check_compatible(step, {"params": target}, partial=True)
            state = self.manager.item_metadata(step)["state"]
            if key not in state:
                raise CheckpointError(
                    f"checkpoint {self.directory} step {step} has no {key!r} state (saved: "
                    f"{', '.join(sorted(state))})"
                )
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
        return step, out["state"][key]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self._join_sealing()
        self.manager.close()


def saved_directory(workdir: str) -> str | None:
    """The ``checkpoint.directory`` that ``WORKDIR/config.json`` names; None if it names none."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            return json.load(f).get("checkpoint", {}).get("directory") or None
    except (OSError, ValueError, AttributeError):
        return None


def load_params(
    workdir: str,
    target: PyTree,
    step: int | None = None,
    key: str = "params",
    directory: str | None = None,
) -> tuple[int, PyTree]:
    """(step, params) of ``workdir``'s checkpoint ``step`` (default: the latest), read-only, each
    array placed on the sharding of ``target`` (abstract arrays); no optimizer state is read.
    ``key="ema"`` reads the parameters' moving average instead (``train.ema_decay > 0``).
    ``directory``: where the checkpoints are; default: the ``checkpoint.directory`` of the run's
    ``WORKDIR/config.json``, else ``WORKDIR/checkpoints``."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    directory = directory or saved_directory(workdir)
    ckpt = Checkpointer(workdir, directory=directory, read_only=True)
    try:
        return ckpt.restore_params(step, target, key)
    except DamagedCheckpointError as e:
        others = [s for s in ckpt.all_steps() if s != e.step]
        hint = f"; pick another with --step (saved: {others})" if others else ""
        raise DamagedCheckpointError(ckpt.directory, e.step, e.reason, hint) from None
    finally:
        ckpt.close()
