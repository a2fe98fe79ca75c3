"""Command line: ``python -m monai_patchqueue demo [options]`` (also the ``monai-patchqueue`` script)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _int_at_least(minimum: int, kind: str):
    """Return an argparse type accepting integers of at least ``minimum`` (described as ``kind``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


def _parser() -> argparse.ArgumentParser:
    script = Path(sys.argv[0]).name == "monai-patchqueue"  # the console script, rather than python -m
    parser = argparse.ArgumentParser(
        prog="monai-patchqueue" if script else "python -m monai_patchqueue", description=__doc__
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a UNet on patches of the embedded brain's left half, segment it, score the right half"
    )
    demo.add_argument("--output", type=Path, default=Path("monai_patchqueue_demo"), help="output folder")
    demo.add_argument("--iterations", type=_positive_int, default=600, help="training batches of 4 patches")
    demo.add_argument("--patch-size", type=_positive_int, default=32, help="edge of the cubic patches (at most 36)")
    demo.add_argument("--samples-per-volume", type=_positive_int, default=16, help="patches per queued subject")
    demo.add_argument("--workers", type=_non_negative_int, default=1, help="background processes of the queue")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    demo.add_argument("--seed", type=int, default=0, help="seed of the network, queue and augmentation")
    samplers = commands.add_parser("samplers", help="draw patches from the embedded brain with every sampler")
    samplers.add_argument("--output", type=Path, default=Path("monai_patchqueue_demo"), help="output folder")
    samplers.add_argument("--patch-size", type=_positive_int, default=24, help="edge of the cubic patches")
    samplers.add_argument("--num-samples", type=_positive_int, default=16, help="patches per random sampler")
    samplers.add_argument("--seed", type=int, default=0, help="seed of the random samplers")
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.command == "samplers":
        from .demo import run_demo

        run_demo(args.output, patch_size=args.patch_size, num_samples=args.num_samples, seed=args.seed)
        return
    import torch

    from .training_demo import run_training_demo

    try:
        torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device should name a torch device such as cpu or cuda, but got {args.device!r}") from None
    run_training_demo(args.output, iterations=args.iterations, patch_size=args.patch_size,
                      samples_per_volume=args.samples_per_volume, workers=args.workers, device=args.device,
                      seed=args.seed)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _run(args)
    except (ValueError, TypeError, KeyError, OSError) as error:
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
