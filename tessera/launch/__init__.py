"""Start a command on every process of a run: on this machine (``local``), later on TPU pods."""
