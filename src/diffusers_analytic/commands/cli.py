"""The `diffusers-analytic` command (also `python -m diffusers_analytic`): one module per subcommand.

The subcommand modules register their options without importing torch or diffusers (they import the library inside
`run`), so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import build, calibrate, compare, evaluate, fit, generate, push

# Each subcommand module has `register(subparsers)` and `run(args)`; listed here line by line.
SUBCOMMANDS = {
    "fit": fit,
    "generate": generate,
    "build": build,
    "push": push,
    "compare": compare,
    "calibrate": calibrate,
    "evaluate": evaluate,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusers-analytic",
        description="Fit analytic diffusion denoisers and generate images with them through diffusers.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS.values():
        module.register(subparsers)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted (not the stream of when the CLI first ran, which a
    test runner or a caller that redirects stderr may have closed since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _show_package_info_logs() -> None:
    """The package's loggers (`diffusers_analytic.*`) report progress at INFO on stderr; diffusers stays at WARNING."""
    package_logger = logging.getLogger("diffusers_analytic")
    package_logger.setLevel(logging.INFO)
    if not package_logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[diffusers-analytic] %(message)s"))
        package_logger.addHandler(handler)
        package_logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    _show_package_info_logs()
    args = build_parser().parse_args(argv)
    try:
        SUBCOMMANDS[args.command].run(args)
    except (ValueError, TypeError, OSError) as error:  # (FileNotFoundError, ConnectionError are OSErrors)
        message = " ".join(str(error).split())  # one line, whatever the library's message
        print(f"diffusers-analytic {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
