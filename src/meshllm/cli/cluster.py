"""`meshllm cluster {install,start,plan,status,logs,test,stop} -c cluster.toml`: one command for a whole cluster."""

from __future__ import annotations

import argparse

DEFAULT_CONFIG = "cluster.toml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="cluster_action", metavar="ACTION", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "-c", "--config", default=DEFAULT_CONFIG, help=f"the cluster file (default {DEFAULT_CONFIG})"
        )
        return sub

    action("install", "make a venv with this meshllm on every device that lacks it or has another version")
    start = action("start", "check every device, start the workers and the coordinator, print the API's URL")
    start.add_argument(
        "--install",
        action="store_true",
        help="first install meshllm where it is missing (see `cluster install`)",
    )
    start.add_argument(
        "--force", action="store_true", help="stop processes of an earlier start that no longer answer, first"
    )
    start.add_argument(
        "--timeout", type=float, default=300.0, help="seconds each process may take to answer (default 300)"
    )
    plan = action(
        "plan", "measure every device and link, print the split and its predicted speed (loads nothing)"
    )
    plan.add_argument(
        "--timeout", type=float, default=300.0, help="seconds the workers and the measurement may take"
    )
    action("status", "a table of every device: state, layers, memory, round-trip time")
    logs = action("logs", "show the devices' logs (read over ssh for remote devices)")
    logs.add_argument("device", nargs="?", default=None, help="only this device (default: all)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument(
        "-n", "--lines", type=int, default=20, help="lines from the end of each log (default 20)"
    )
    test = action("test", "send one chat completion through the API; print the reply and tokens/s")
    test.add_argument("--prompt", default="Hello!", help="the user message (default 'Hello!')")
    test.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default 32)")
    stop = action("stop", "stop the coordinator, then the workers, and check their ports are free")
    stop.add_argument(
        "--grace", type=float, default=10.0, help="seconds after SIGTERM before SIGKILL (default 10)"
    )


def run(args: argparse.Namespace) -> int:
    from meshllm.cluster.install import Installer, with_installed_pythons
    from meshllm.config import load_cluster

    cluster = load_cluster(args.config)
    if args.cluster_action == "install" or getattr(args, "install", False):
        Installer(cluster, echo=_echo).run()
        if args.cluster_action == "install":
            return 0
    cluster = with_installed_pythons(cluster)  # the venvs `install` made, where it made them
    if args.cluster_action == "start":
        from meshllm.cluster.start import Starter

        return Starter(cluster, force=args.force, timeout=args.timeout, echo=_echo).run()
    if args.cluster_action == "plan":
        from meshllm.cluster.plan import show_plan

        return show_plan(cluster, timeout=args.timeout, echo=_echo)
    if args.cluster_action == "status":
        from meshllm.cluster.status import show_status

        return show_status(cluster, echo=_echo)
    if args.cluster_action == "logs":
        from meshllm.cluster.logs import show_logs

        return show_logs(cluster, args.device, args.lines, args.follow)
    if args.cluster_action == "test":
        from meshllm.cluster.smoke import chat_once

        return chat_once(cluster, prompt=args.prompt, max_tokens=args.max_tokens, echo=_echo)
    from meshllm.cluster.stop import stop_cluster

    return stop_cluster(cluster, grace=args.grace, echo=_echo)


def _echo(line: str) -> None:
    print(line, flush=True)
