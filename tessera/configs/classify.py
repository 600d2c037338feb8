"""Rule classification on the embedded corpus (task ``classify``): a small causal trunk read out
at each row's last token says which rule (add, copy, rev, sort) an example follows. A second
task through the same Trainer, and the template for classifiers of other inputs."""

from tessera.configs.base import ConfigDict, make_get_config


def _tiny(c: ConfigDict) -> None:
    """About 25 s on a 2-core CPU to ~0.73 eval accuracy (chance: 0.25); add is easy, copy/rev/sort
    need the answer compared with the word."""
    c.model.update(name="sequence_classifier", num_classes=4, max_seq_len=32)
    c.data.update(seq_len=24, global_batch_size=32)
    c.train.update(task="classify", steps=200, log_every=25)
    c.eval.update(every=100, batches=8)
    c.checkpoint.every = 200


get_config = make_get_config({"tiny": _tiny})
