"""The `diffusers-analytic` command (also `python -m diffusers_analytic`): one module per subcommand."""

from __future__ import annotations

import argparse
import sys

from . import calibrate, compare, fit, generate

# Each subcommand module has `register(subparsers)` and `run(args)`; listed here line by line.
SUBCOMMANDS = {
    "fit": fit,
    "generate": generate,
    "compare": compare,
    "calibrate": calibrate,
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


def main(argv: list[str] | None = None) -> int:
    from diffusers.utils import logging

    logging.set_verbosity_info()
    args = build_parser().parse_args(argv)
    try:
        SUBCOMMANDS[args.command].run(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"diffusers-analytic {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
