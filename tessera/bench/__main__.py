"""``python -m tessera.bench {train,decode,sample} --config=llama:small [--config=...]
[--config.a.b=v]``.

``--config`` may repeat: each config is benchmarked with the same overrides, e.g. two families at
the same width. Benchmarks print tables; they are never timed assertions in tests.
"""

from __future__ import annotations

import argparse
import sys

from tessera.cli import USER_ERRORS, config_overrides, fail


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tessera.bench")
    parser.add_argument("bench", choices=["train", "decode", "sample"])
    parser.add_argument("--config", required=True, action="append",
                        help="e.g. llama:small or path.py:arg; repeat to compare configs")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (train)")
    parser.add_argument("--contexts", default="256,2048",
                        help="decode: cache contexts for the per-token decode time")
    parser.add_argument("--cache_only", action="store_true",
                        help="decode: print only each config's cache bytes per token (abstract)")
    parser.add_argument("--workdir", help="sample: the diffusion workdir to sample from")
    parser.add_argument("--samplers", default="ddim:20,dpmpp_2m:10",
                        help="sample: sampler:steps settings")
    parser.add_argument("--guidances", default="1,4", help="sample: guidance scales")
    parser.add_argument("--num_images", type=int, default=96, help="sample: images per setting")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="sample: images per sampling batch (default: all)")
    parser.add_argument("--judge", default=None,
                        help="sample: CONFIG@WORKDIR of a classifier that judges the classes")
    parser.add_argument("--flops_only", action="store_true",
                        help="sample: print only each denoiser's analytic FLOPs (no workdir)")
    args, rest = parser.parse_known_args(argv)
    overrides = config_overrides(parser, rest)
    try:
        contexts = [int(c) for c in args.contexts.split(",") if c]
        if args.bench == "sample":
            _sample(args, overrides)
            return
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


def _sample(args: argparse.Namespace, overrides: dict) -> None:
    from tessera.bench.sample import parse_samplers, run_flops_table, run_sample_bench

    if args.flops_only:
        run_flops_table(args.config, overrides)
        return
    if not args.workdir:
        raise ValueError("bench sample needs --workdir (or --flops_only)")
    if args.num_images < 1:
        raise ValueError(f"--num_images must be >= 1, got {args.num_images}")
    guidances = [float(g) for g in args.guidances.split(",") if g]
    for spec in args.config:
        run_sample_bench(
            spec, overrides, workdir=args.workdir, samplers=parse_samplers(args.samplers),
            guidances=guidances, num_images=args.num_images, judge=args.judge,
            batch_size=args.batch_size,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
