"""The ``fastrlhf`` command line: ``bench``, ``verify`` and ``demo``."""

from __future__ import annotations

import argparse
import sys

from fastrlhf.bench import OPS


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="fastrlhf", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="time fused ops against their references on this machine")
    bench.add_argument("--quick", action="store_true", help="small grid, under a minute on 2 CPU cores")
    bench.add_argument("--json", metavar="PATH", help="write the numbers here, and a speed-up plot beside it (.png)")
    bench.add_argument("--ops", nargs="+", choices=OPS, help="only these ops")
    bench.add_argument("--integrations", action="store_true",
                       help="instead, each function that fastrlhf.integrations patches against the package's own")

    verify = commands.add_parser("verify", help="check every op on every backend against float64 references")
    verify.add_argument("--interpret", action="store_true",
                        help="also run the Triton kernels under the interpreter on CPU (slow)")
    verify.add_argument("--ops", nargs="+", choices=OPS, help="only these ops")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "bench":
        from fastrlhf.bench.runner import main as command
    else:
        from fastrlhf.bench.verify import main as command
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
