"""``python -m tessera.bench {train,decode,sample} --config=llama:small [--config=...]
[--config.a.b=v]``, ``python -m tessera.bench decode --against=hf [--models=llama,mamba2]``
(tessera next to transformers ``generate``, ``bench/against_hf.py``),
``python -m tessera.bench attention [--lengths=1024,4096] [--tpu=v5e-4]``, and
``python -m tessera.bench recurrence [--ops=ssd,rwkv6] [--lengths=...] [--tpu=v5p-8]``, and
``python -m tessera.bench data --config=llama:small [--batches=50] [--processes=P]
[--packings=greedy,first_fit] [--step_tokens_per_s=X | --no_step]`` (the input pipeline's rows,
documents and tokens per second per host against the slots per second the train step consumes
per host; ``bench/data.py``).

``--config`` may repeat: each config is benchmarked with the same overrides, e.g. two families at
the same width. Benchmarks print tables; they are never timed assertions in tests.
"""

from __future__ import annotations

import argparse
import sys

from tessera.cli import USER_ERRORS, config_overrides, fail


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tessera.bench")
    parser.add_argument("bench", choices=["train", "decode", "sample", "attention", "recurrence",
                                            "data"])
    parser.add_argument("--config", action="append",
                        help="e.g. llama:small or path.py:arg; repeat to compare configs "
                             "(train, decode, sample, data)")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps (train; data: of the step it measures)")
    parser.add_argument("--contexts", default="256,2048",
                        help="decode: cache contexts for the per-token decode time")
    parser.add_argument("--slots", default="96,1024",
                        help="decode: allocated cache slots compared at one filled length "
                             "(batch 16; empty: skip)")
    parser.add_argument("--cpu_kernels", default="on",
                        help="decode: on, off or on,off (each case with and without tessera's "
                             "CPU decode kernels, side by side)")
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
    _against_flags(parser)
    _data_flags(parser)
    _attention_flags(parser)
    _recurrence_flags(parser)
    args, rest = parser.parse_known_args(argv)
    overrides = config_overrides(parser, rest)
    if args.against:
        if args.bench != "decode":
            parser.error("--against works with bench decode only")
        _against(parser, args)
        return
    if args.bench == "attention":
        _attention(parser, args)
        return
    if args.bench == "recurrence":
        _recurrence(parser, args)
        return
    if args.bench == "data":
        _data(parser, args, overrides)
        return
    if not args.config:
        parser.error(f"bench {args.bench} needs --config")
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

                slots = [int(n) for n in args.slots.split(",") if n]
                run_decode_bench(spec, overrides, contexts=contexts, slots=slots,
                                 cpu_kernels=[c for c in args.cpu_kernels.split(",") if c])
    except USER_ERRORS as e:
        fail(str(e))


def _against_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decode --against=hf (also --repeats)")
    group.add_argument("--against", choices=["hf"], default=None,
                       help="decode: side by side with Hugging Face transformers generate on "
                            "the same random weights (no --config)")
    group.add_argument("--hf_python", default=None,
                       help="decode --against: python of the virtualenv with torch and "
                            "transformers (default /tmp/hfvenv/bin/python)")
    group.add_argument("--models", default="llama,mamba2", help="decode --against: models")
    group.add_argument("--batches", default=None,
                       help="decode --against: batch sizes (default 1,16); data: timed batches "
                            "per round (default 50)")
    group.add_argument("--prompt_len", type=int, default=32,
                       help="decode --against: prompt tokens")
    group.add_argument("--new_tokens", type=int, default=256,
                       help="decode --against: new tokens per row")


def _against(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from tessera.bench.against_hf import HF_PYTHON, run_against_hf

    if args.config:
        parser.error("decode --against=hf benchmarks its own shapes (--models), not --config")
    try:
        batches = [int(b) for b in (args.batches or "1,16").split(",") if b]
    except ValueError:
        parser.error("--batches takes comma-separated integers")
    try:
        run_against_hf(
            [m for m in args.models.split(",") if m], batches=batches,
            prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
            hf_python=args.hf_python or HF_PYTHON,
        )
    except USER_ERRORS as e:
        fail(str(e))


def _data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data (also --config, --batches, --steps)")
    group.add_argument("--processes", type=int, default=None,
                       help="data: run as process 0 of this many (its batch is global / P; "
                            "default: this run's process count)")
    group.add_argument("--packings", default="",
                       help="data: data.packing values to compare, e.g. greedy,first_fit "
                            "(first_fit:W: data.pack_window=W; default: the config's)")
    group.add_argument("--rounds", type=int, default=3,
                       help="data: rounds of --batches batches, alternating the packings")
    step = group.add_mutually_exclusive_group()
    step.add_argument("--step_tokens_per_s", type=float, default=None,
                      help="data: the job's train tokens/s (batch x seq_len per step, as bench "
                           "train and tessera.aot count them) instead of measuring a step here")
    step.add_argument("--no_step", action="store_true",
                      help="data: measure the pipeline only (no step, no compile)")


def _data(parser: argparse.ArgumentParser, args: argparse.Namespace, overrides: dict) -> None:
    from tessera.bench.data import run_data_bench

    if not args.config:
        parser.error("bench data needs --config")
    try:
        batches = int(args.batches or 50)
    except ValueError:
        parser.error("bench data: --batches takes one integer")
    try:
        for spec in args.config:
            run_data_bench(
                spec, overrides, batches=batches, rounds=args.rounds, processes=args.processes,
                packings=[p for p in args.packings.split(",") if p] or None,
                step_tokens_per_s=args.step_tokens_per_s, measure_step=not args.no_step,
                steps=args.steps,
            )
    except USER_ERRORS as e:
        fail(str(e))


ATTENTION_LENGTHS = "1024,2048,4096,8192,16384,32768"


def _attention_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("attention")
    group.add_argument("--lengths", default=ATTENTION_LENGTHS,
                       help="attention: sequence lengths T (recurrence: default "
                            "1024,4096,16384,65536)")
    group.add_argument("--batch", type=int, default=1, help="attention: batch (per TPU device)")
    group.add_argument("--heads", type=int, default=8, help="attention: query heads")
    group.add_argument("--kv_heads", type=int, default=None,
                       help="attention: key / value heads (default: --heads)")
    group.add_argument("--head_dim", type=int, default=128, help="attention: head dim")
    group.add_argument("--dtype", default="bfloat16", help="attention: q / k / v dtype")
    group.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                       help="attention: causal (--no-causal: bidirectional)")
    group.add_argument("--repeats", type=int, default=3,
                       help="attention, decode --against: timed runs (median)")
    group.add_argument("--max_scores_gib", type=float, default=2.0,
                       help="attention: skip the plain xla impl past this many GiB of scores")
    group.add_argument("--tpu", default=None,
                       help="attention: TPU topology to AOT-compile for (default v5p-8 when "
                            "libtpu is installed)")
    group.add_argument("--no-tpu", dest="no_tpu", action="store_true",
                       help="attention: skip the TPU section")
    group.add_argument("--tpu_lengths", default=None,
                       help="attention: lengths for the TPU section (default: --lengths)")
    group.add_argument("--cost_max_length", type=int, default=4096,
                       help="attention: TPU cost from unrolled kernel loops up to this length")


def _attention(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from tessera.aot.topology import LibtpuMissingError, have_libtpu
    from tessera.bench.attention import Problem, run_attention_bench

    try:
        lengths = [int(n) for n in args.lengths.split(",") if n]
        tpu_lengths = [int(n) for n in args.tpu_lengths.split(",") if n] if args.tpu_lengths \
            else None
    except ValueError:
        parser.error("--lengths / --tpu_lengths take comma-separated integers")
    tpu = None if args.no_tpu else args.tpu or ("v5p-8" if have_libtpu() else None)
    problem = Problem(batch=args.batch, heads=args.heads, kv_heads=args.kv_heads or args.heads,
                      head_dim=args.head_dim, dtype=args.dtype, causal=args.causal)
    try:
        run_attention_bench(problem, lengths, repeats=args.repeats, tpu=tpu,
                            tpu_lengths=tpu_lengths, max_scores_gib=args.max_scores_gib,
                            cost_max_length=args.cost_max_length)
    except (*USER_ERRORS, LibtpuMissingError) as e:
        fail(str(e))


def _recurrence_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("recurrence (--lengths, --tpu, --no-tpu, --repeats and "
                                      "--tpu_lengths as for attention)")
    group.add_argument("--ops", default="ssd,retention,rwkv6,delta_rule,selective_scan",
                       help="recurrence: ops to run")
    group.add_argument("--impls", default="",
                       help="recurrence: also run these impls auto never picks (parallel, "
                            "associative)")
    group.add_argument("--local_divisor", type=int, default=8,
                       help="recurrence: divide heads / channels by this on this machine")
    group.add_argument("--no-local", dest="no_local", action="store_true",
                       help="recurrence: skip the table on this machine")
    group.add_argument("--tpu_batch", type=int, default=4,
                       help="recurrence: batch per TPU device")


def _recurrence(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from tessera.aot.topology import LibtpuMissingError, have_libtpu
    from tessera.bench.recurrence import run_recurrence_bench

    default = "1024,4096,16384,65536"
    try:
        lengths = [int(n) for n in args.lengths.split(",") if n] \
            if args.lengths != ATTENTION_LENGTHS else [int(n) for n in default.split(",")]
        tpu_lengths = [int(n) for n in args.tpu_lengths.split(",") if n] if args.tpu_lengths \
            else None
    except ValueError:
        parser.error("--lengths / --tpu_lengths take comma-separated integers")
    if args.local_divisor < 1 or args.tpu_batch < 1:
        parser.error("--local_divisor and --tpu_batch must be >= 1")
    tpu = None if args.no_tpu else args.tpu or ("v5p-8" if have_libtpu() else None)
    try:
        run_recurrence_bench(
            [n for n in args.ops.split(",") if n], lengths, batch=args.batch,
            divisor=args.local_divisor, repeats=args.repeats, tpu=tpu, tpu_lengths=tpu_lengths,
            tpu_batch=args.tpu_batch, named=[n for n in args.impls.split(",") if n],
            local=not args.no_local,
        )
    except (*USER_ERRORS, LibtpuMissingError) as e:
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
