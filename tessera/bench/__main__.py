"""``python -m tessera.bench {train,decode} --config=llama:small [--steps N] [--config.a.b=v]``.

Benchmarks print tables; they are never timed assertions in tests.
"""

from __future__ import annotations

import argparse
import sys

from tessera.cli import USER_ERRORS, fail


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tessera.bench")
    parser.add_argument("bench", choices=["train", "decode"])
    parser.add_argument("--config", required=True, help="e.g. llama:small or path.py:arg")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (train)")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for item in rest:
        if not (item.startswith("--config.") and "=" in item):
            parser.error(f"unrecognized argument {item!r} (overrides look like --config.a.b=v)")
        key, value = item[len("--config."):].split("=", 1)
        overrides[key] = value
    try:
        if args.bench == "train":
            from tessera.bench.train import run_train_bench

            run_train_bench(args.config, overrides, steps=args.steps)
        else:
            from tessera.bench.decode import run_decode_bench

            run_decode_bench(args.config, overrides)
    except USER_ERRORS as e:
        fail(str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
