"""Command line: ``python -m monai_patchqueue demo [options]`` (also the ``monai-patchqueue`` script)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m monai_patchqueue", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="draw patches from the embedded brain with every sampler")
    demo.add_argument("--output", type=Path, default=Path("monai_patchqueue_demo"), help="output folder")
    demo.add_argument("--patch-size", type=_positive_int, default=24, help="edge of the cubic patches")
    demo.add_argument("--num-samples", type=_positive_int, default=16, help="patches per random sampler")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random samplers")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    from .demo import run_demo

    try:
        run_demo(args.output, patch_size=args.patch_size, num_samples=args.num_samples, seed=args.seed)
    except (ValueError, TypeError, KeyError, OSError) as error:
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
