"""Train loop, tasks, optimizers, checkpoints, metrics and FLOP counters."""
