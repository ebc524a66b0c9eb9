"""`meshllm supervise --name NAME --status-file PATH [--log PATH] -- COMMAND...`: run COMMAND (a worker)
and start it again whenever it exits, with a capped backoff; `cluster start` runs every worker so."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="the device's name, in logs and the status file")
    parser.add_argument("--status-file", required=True, help="where each state change and exit is written")
    parser.add_argument("--log", default=None, help="the worker's log file (its tail is kept with each exit)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the worker's command line")


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from meshllm.errors import ConfigError
    from meshllm.log import setup_logging
    from meshllm.runtime.supervisor import Supervisor

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ConfigError("supervise: give the worker's command after --")
    setup_logging(f"supervisor {args.name}")
    log_file = Path(os.path.expanduser(args.log)) if args.log else None
    status_file = Path(os.path.expanduser(args.status_file))
    return Supervisor(args.name, command, status_file, log_file).run()
