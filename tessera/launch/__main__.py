"""Start a command on every process of a run.

``python -m tessera.launch local --num_processes=2 --cpu_devices=4 -- python -m tessera.train
--config=llama:tiny --workdir=runs/mp``: N processes on this machine (``local.py``).

``python -m tessera.launch tpu-vm --tpu=NAME --zone=ZONE --setup``, then ``... tpu-vm --tpu=NAME
--zone=ZONE -- python -m tessera.train ...``: every host of a TPU VM slice through gcloud
(``--logs`` follows host 0, ``--stop`` makes every host save and exit).

``python -m tessera.launch xpk --cluster=C --workload=W --tpu_type=v5p-64 --docker_image=IMG --
python -m tessera.train ...``: every host of a GKE TPU slice through xpk (``pods.py``).

``--dry_run`` prints the commands, one a line, instead of running them.
"""

from __future__ import annotations

import argparse
import sys

from tessera.cli import error_line, fail
from tessera.launch import local, pods


def _pod_options(p: argparse.ArgumentParser, stop_help: str) -> None:
    """Options every pod launcher has; the command comes last, after ``--``."""
    action = p.add_mutually_exclusive_group()
    action.add_argument("--logs", action="store_true", help="follow the log of host 0")
    action.add_argument("--stop", action="store_true", help=stop_help)
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="set in the command's environment (repeatable)")
    p.add_argument("--dry_run", action="store_true",
                   help="print the commands, one a line, instead of running them")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tessera.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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

    tv = sub.add_parser("tpu-vm", help="every host of a TPU VM slice (gcloud ssh --worker=all)")
    tv.add_argument("--tpu", required=True, help="the TPU VM's name")
    tv.add_argument("--zone", required=True)
    tv.add_argument("--project", default=None, help="default: gcloud's configured project")
    tv.add_argument("--dir", default="~/tessera", help="tessera's directory on every host")
    tv.add_argument("--setup", action="store_true",
                    help="copy this checkout's HEAD to every host and install it in DIR/.venv")
    tv.add_argument("--no_follow", action="store_true",
                    help="start the command without following host 0's log")
    _pod_options(tv, "SIGTERM on every host (tessera saves and exits); waits until they end")

    xp = sub.add_parser("xpk", help="every host of GKE TPU slices (xpk workload create)")
    xp.add_argument("--cluster", required=True)
    xp.add_argument("--workload", required=True, help="the workload's name (xpk's rules)")
    xp.add_argument("--project", default=None)
    xp.add_argument("--zone", default=None)
    xp.add_argument("--tpu_type", default=None, help="e.g. v5p-64 (to start)")
    xp.add_argument("--num_slices", type=int, default=1)
    xp.add_argument("--docker_image", default=None,
                    help="an image built from tools/Dockerfile and pushed (to start)")
    xp.add_argument("--max_restarts", type=int, default=0,
                    help="restarts of the workload after a failure (each resumes from the "
                         "last checkpoint)")
    xp.add_argument("--grace_s", type=int, default=300,
                    help="seconds a pod has to save after SIGTERM before it is killed")
    _pod_options(xp, "delete the workload (its pods get SIGTERM: tessera saves and exits)")
    return p


def _tpu_vm(args: argparse.Namespace, command: list[str]) -> list[list[str]]:
    vm = pods.TpuVm(args.tpu, args.zone, args.project, args.dir)
    if args.setup or args.logs or args.stop:
        if command:
            raise ValueError("--setup, --logs and --stop take no command")
        if args.setup and (args.logs or args.stop):
            raise ValueError("--setup goes alone (not with --logs or --stop)")
        if args.setup:
            return pods.setup_commands(vm)
        return [pods.follow_command(vm) if args.logs else pods.stop_command(vm)]
    return pods.start_commands(vm, command, env=pods.parse_env(args.env),
                               follow=not args.no_follow)


def _xpk(args: argparse.Namespace, command: list[str]) -> list[list[str]]:
    w = pods.Xpk(args.cluster, args.workload, args.project, args.zone)
    if args.logs or args.stop:
        if command:
            raise ValueError("--logs and --stop take no command")
        return [pods.xpk_logs_command(w) if args.logs else pods.xpk_delete_command(w)]
    missing = [f"--{k}" for k in ("tpu_type", "docker_image") if not getattr(args, k)]
    if missing:
        raise ValueError(f"{' and '.join(missing)} needed to start a workload")
    return [pods.xpk_create_command(
        w, command, tpu_type=args.tpu_type, docker_image=args.docker_image,
        num_slices=args.num_slices, env=pods.parse_env(args.env),
        max_restarts=args.max_restarts, grace_s=args.grace_s,
    )]


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if args.where == "local":
            code = local.run(
                command, num_processes=args.num_processes, cpu_devices=args.cpu_devices,
                log_dir=args.log_dir, grace_s=args.grace_s, port=args.port,
            )
        else:
            commands = (_tpu_vm if args.where == "tpu-vm" else _xpk)(args, command)
            if args.dry_run:
                sys.stdout.write(pods.format_commands(commands))
                code = 0
            else:
                code = pods.run(commands)
    except (ValueError, FileNotFoundError) as e:
        fail(error_line(e))
    except KeyboardInterrupt:
        fail("interrupted; a run already started on the hosts goes on until --stop", 130)
    sys.exit(code)


if __name__ == "__main__":
    main()
