"""The `meshllm` command. Each sub-command lives in its own module with `add_arguments` and `run`;
those modules import heavy libraries (torch, grpc) inside `run` only, so `meshllm --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

from meshllm import __version__
from meshllm.errors import MeshError

# name -> (module, one-line help). The module defines add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "generate": ("meshllm.cli.generate", "generate text in one process (K in-process stages)"),
    "serve": ("meshllm.cli.serve", "serve the OpenAI-compatible API from a local cluster"),
    "worker": ("meshllm.cli.worker", "run a stage worker that waits for the coordinator"),
    "supervise": ("meshllm.cli.supervise", "run a worker and start it again whenever it exits"),
    "cluster": ("meshllm.cli.cluster", "start, inspect and stop a cluster described in a TOML file"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshllm", description="One model, several machines, one API.")
    parser.add_argument("--version", action="version", version=f"meshllm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue  # a command whose module is not part of this build
        sub = commands.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except MeshError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
