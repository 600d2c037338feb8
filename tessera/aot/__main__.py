"""``python -m tessera.aot --config=llama:8b --topology=v5p-128 [--num_slices=2] [--decode]``.

Compiles the real train step (``--decode``: the prefill and decode loop) for a TPU topology on
any machine with libtpu installed, allocating nothing, and prints HBM per device against the
chip's capacity, XLA's cost, the analytic FLOPs, a predicted step time and MFU, and the
collectives; with ``--decode``, a decode step's predicted time against its HBM roofline.
Overrides: ``--config.a.b=value``. Exit codes: 0 fits, 1 does not fit in HBM, 2 bad input
(unknown topology, a mesh the topology cannot hold, libtpu missing, bad config), 3 the tool
itself failed (the traceback is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tessera.aot.compile import Target
    from tessera.configs.base import ConfigDict

EXIT_DOES_NOT_FIT = 1
EXIT_CRASHED = 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tessera.aot", description=__doc__.split("\n")[2])
    p.add_argument("--config", required=True, help="e.g. llama:8b or path.py:arg")
    p.add_argument("--topology", required=True, help="e.g. v5p-128, v6e-256, v5p:4x4x4")
    p.add_argument("--num_slices", type=int, default=1, help="slices joined by DCN")
    p.add_argument("--decode", action="store_true", help="compile prefill + decode, not training")
    p.add_argument("--per_device_batch", type=int, default=None,
                   help="sets data.global_batch_size to this times the devices")
    p.add_argument("--decode_batch", type=int, default=None, help="default: decode.batch_size")
    p.add_argument("--prompt_len", type=int, default=None, help="default: decode.prompt_len")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="default: decode.max_new_tokens")
    p.add_argument("--predict", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the cost programs for a predicted step time (train: 1/2-unit "
                   "programs; --decode: one-step decode programs)")
    p.add_argument("--splash_estimates", action=argparse.BooleanOptionalAction, default=True,
                   help="cost splash attention's Pallas kernels (off: XLA leaves them uncosted, "
                   "as in a program that attaches no estimate)")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--dump_hlo", default=None, help="write the HLO (before/after XLA) here")
    return p


def run(argv: list[str] | None = None) -> int:
    """The tool; returns its exit code (user errors raise, ``main`` prints them)."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    from tessera.cli import config_overrides

    overrides = config_overrides(parser, rest)
    if not args.splash_estimates:
        from tessera.kernels.attention import splash

        splash.set_cost_estimates(False)
    from tessera.aot import compile as aot
    from tessera.aot import report as rep
    from tessera.aot.analysis import nan_to_none
    from tessera.aot.topology import parse_topology
    from tessera.configs import load_config

    topology = parse_topology(args.topology, args.num_slices)
    config = load_config(args.config, overrides)
    target = aot.make_target(topology)
    if args.per_device_batch is not None:
        config = aot.set_per_device_batch(config, args.per_device_batch, len(target.devices))
    try:
        with aot.quiet():
            report = _compile_and_print(args, config, target)
    except aot.DoesNotFitError as e:
        report = rep.refused_report(args.config, target, e)
        print(rep.refused_line(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(nan_to_none(report), f, indent=2)
    return 0 if report["hbm"]["fits"] else EXIT_DOES_NOT_FIT


def _compile_and_print(args: argparse.Namespace, config: ConfigDict, target: Target) -> dict:
    from tessera.aot import compile as aot
    from tessera.aot import report as rep
    from tessera.train.flops import causal_saving_per_token

    if args.decode:
        d = config.decode
        request = dict(
            batch=args.decode_batch or d.batch_size,
            prompt_len=args.prompt_len or d.prompt_len,
            max_new_tokens=args.max_new_tokens or d.max_new_tokens,
        )
        compiled = aot.compile_decode(config, target, **request, dump_hlo=args.dump_hlo)
        predicted = (
            aot.predict_decode(config, target, **request, decode_chunk=compiled["decode_chunk"])
            if args.predict else None
        )
        report = rep.decode_report(args.config, config, target, compiled, predicted)
        rep.print_decode(report)
        return report
    compiled = aot.compile_train(config, target, args.dump_hlo)
    predicted = aot.predict_train(config, target) if args.predict else None
    seq = int(config.data.seq_len)
    saving = 0.0
    if config.train.task == "lm":
        saving = causal_saving_per_token(config.model, seq) * seq * config.data.global_batch_size
    report = rep.train_report(args.config, config, target, compiled, predicted, saving)
    rep.print_train(report)
    return report


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiles for TPU; runs nothing here
    from tessera.aot.topology import LibtpuMissingError, quiet_libtpu_env
    from tessera.cli import USER_ERRORS, error_line, fail

    quiet_libtpu_env()
    try:
        code = run(argv)
    except (*USER_ERRORS, LibtpuMissingError) as e:
        fail(error_line(e))
    except Exception:  # a crash must not read as exit 1, "does not fit"
        traceback.print_exc()
        sys.exit(EXIT_CRASHED)
    sys.exit(code)


if __name__ == "__main__":
    main()
