"""The job tests/multiprocess/test_two_processes.py runs on 2 processes × 4 CPU devices
(``tessera.launch local``): one train step, a checkpoint saved by both processes, a restore of a
checkpoint one process saved, an evaluation, and a greedy decode. Process 0 writes the gathered
results to ``OUT/results.npz``; each process writes its first batch to ``OUT/batch-I.npz`` and the
next two to ``OUT/more-I.npz``.

  python -m tessera.launch local --num_processes=2 --cpu_devices=4 -- \
      python -m tests.multiprocess.job OUT ONE_PROCESS_WORKDIR
"""

from __future__ import annotations

import os
import sys

from tessera import distributed


def main(out: str, saved_by_one: str) -> None:
    distributed.initialize()
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from tessera.serve.loading import load_decoder
    from tessera.train.checkpoints import Checkpointer
    from tessera.train.trainer import Trainer
    from tests.multiprocess.shared import PROMPT, config, flat

    index, count = jax.process_index(), jax.process_count()
    assert count == 2 and jax.device_count() == 8, (count, jax.device_count())
    cfg = config()
    work = os.path.join(out, "work")
    trainer = Trainer(cfg, work)
    state = trainer.init_state()
    data = trainer.task.make_data("train", process_index=index, process_count=count)
    local = next(data)
    np.savez(os.path.join(out, f"batch-{index}.npz"), **local)
    more = [next(data) for _ in range(2)]
    np.savez(os.path.join(out, f"more-{index}.npz"),
             **{k: np.stack([b[k] for b in more]) for k in more[0]})
    evaluation = trainer.evaluate(state)  # the eval split on two processes
    batch = trainer.device_batch(local)
    loss, grads = trainer.grads(state["params"], batch)
    state, metrics = trainer.step(state, batch)
    ckpt = Checkpointer(work)  # async, as the trainer saves
    ckpt.save(1, state, data.get_state())
    ckpt.close()

    restored = Checkpointer(saved_by_one, read_only=True).restore(None, trainer.abstract_state())
    resumed = trainer.task.make_data("train", process_index=index, process_count=count)
    resumed.set_state(restored[2])  # positions saved by one process: this process's streams
    np.savez(os.path.join(out, f"resumed-{index}.npz"), **next(resumed))

    # Decode from the checkpoint both processes just saved.
    decoder, _ = load_decoder(cfg, work)
    tokens = decoder.generate([PROMPT], max_new_tokens=8, stop_tokens=())[0].tokens

    gathered = multihost_utils.process_allgather(
        {"grads": grads, "params": state["params"], "restored": restored[1]["params"]},
        tiled=True,
    )
    if index == 0:
        results = {"loss": np.asarray(loss), "step_loss": np.asarray(metrics["loss"])}
        results.update({f"evaluation/{k}": np.asarray(v) for k, v in evaluation.items()})
        for key, tree in gathered.items():
            results.update({f"{key}/{k}": v for k, v in flat(tree).items()})
        np.savez(os.path.join(out, "results.npz"), **results)
    np.save(os.path.join(out, f"tokens-{index}.npy"), np.asarray(tokens))


if __name__ == "__main__":
    main(*sys.argv[1:])
