"""``python -m tessera.launch local --num_processes=2 --cpu_devices=4 -- python -m tessera.train
--config=llama:tiny --workdir=runs/mp``: the command on N local processes (``local.py``)."""

from __future__ import annotations

import argparse
import sys

from tessera.cli import error_line, fail
from tessera.launch import local


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tessera.launch", description=__doc__)
    sub = p.add_subparsers(dest="where", required=True)
    lo = sub.add_parser("local", help="N processes on this machine (jax.distributed on CPU)")
    lo.add_argument("--num_processes", type=int, default=2)
    lo.add_argument("--cpu_devices", type=int, default=None,
                    help="CPU devices per process (JAX_PLATFORMS=cpu); default: the platform's")
    lo.add_argument("--log_dir", default=None, help="also write process-I.log files here")
    lo.add_argument("--grace_s", type=float, default=30.0,
                    help="after one process fails, seconds before the others are killed")
    lo.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    lo.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if args.where == "local":
            code = local.run(
                command, num_processes=args.num_processes, cpu_devices=args.cpu_devices,
                log_dir=args.log_dir, grace_s=args.grace_s, port=args.port,
            )
    except ValueError as e:
        fail(error_line(e))
    sys.exit(code)


if __name__ == "__main__":
    main()
