"""``python -m tessera.bench {train,decode} --config=llama:small [--config=...] [--config.a.b=v]``.

``--config`` may repeat: each config is benchmarked with the same overrides, e.g. two families at
the same width. Benchmarks print tables; they are never timed assertions in tests.
"""

from __future__ import annotations

import argparse
import sys

from tessera.cli import USER_ERRORS, config_overrides, fail


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tessera.bench")
    parser.add_argument("bench", choices=["train", "decode"])
    parser.add_argument("--config", required=True, action="append",
                        help="e.g. llama:small or path.py:arg; repeat to compare configs")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (train)")
    parser.add_argument("--contexts", default="256,2048",
                        help="decode: cache contexts for the per-token decode time")
    parser.add_argument("--cache_only", action="store_true",
                        help="decode: print only each config's cache bytes per token (abstract)")
    args, rest = parser.parse_known_args(argv)
    overrides = config_overrides(parser, rest)
    try:
        contexts = [int(c) for c in args.contexts.split(",") if c]
        if args.bench == "decode" and args.cache_only:
            from tessera.bench.decode import run_cache_table

            run_cache_table(args.config, overrides)
            return
        for spec in args.config:
            if args.bench == "train":
                from tessera.bench.train import run_train_bench

                run_train_bench(spec, overrides, steps=args.steps)
            else:
                from tessera.bench.decode import run_decode_bench

                run_decode_bench(spec, overrides, contexts=contexts)
    except USER_ERRORS as e:
        fail(str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
