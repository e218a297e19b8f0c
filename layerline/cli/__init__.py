"""The `layerline` command line: argument parsing, logging set-up and user-facing errors. The only place that reads
argv or configures logging; every command is a thin shell over the library, in the module of its group:
`inprocess` (run, info), `stage`, `client` (generate, score, local), `cluster` (coordinator, status, plan, drain,
certs) and `api`. Each adds its own sub-parsers."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from layerline.cli import api, client, cluster, inprocess, stage
from layerline.errors import LayerlineError

GROUPS = (inprocess, stage, client, cluster, api)


class ArgumentParser(argparse.ArgumentParser):
    """Argument errors as one line, like every other error of the command line (the usage is under --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    return _build()[0]


def _build() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    parser = ArgumentParser(prog="layerline", description="Pipeline-parallel LLM inference over gRPC.")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LAYERLINE_LOG_LEVEL", "WARNING").upper(),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="DEBUG, INFO, WARNING (default; or $LAYERLINE_LOG_LEVEL) or ERROR",
    )
    parser.add_argument(
        "--log-format",
        default=os.environ.get("LAYERLINE_LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="text (default; or $LAYERLINE_LOG_FORMAT) or json: one object per line, with the session it is about",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}
    for group in GROUPS:
        handlers.update(group.add_parsers(sub))
    return parser, handlers


COMMANDS = _build()[1]


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = _build()
    args = parser.parse_args(argv)
    from layerline import logs

    logs.setup(args.log_level, args.log_format)
    try:
        return commands[args.command](args)
    except LayerlineError as e:
        print(f"layerline: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerline: interrupted", file=sys.stderr)
        return 130
