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

    demo = commands.add_parser("demo", help="RLHF end to end on a synthetic task: pre-train, reward model, PPO or GRPO")
    demo.add_argument("--quick", action="store_true", help="a shorter run (under 2 minutes on 2 CPU cores)")
    demo.add_argument("--algo", choices=["ppo", "grpo"], default="ppo", help="the RL algorithm (default ppo)")
    demo.add_argument("--impl", choices=["fused", "reference", "both"], default="fused",
                      help="ops to train with; both: a fused run, then a reference run, shown side by side")
    demo.add_argument("--out", metavar="DIR", help="write metrics.jsonl, summary.json and demo.png here")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=1,
                      help="torch threads (default 1: the demo's models are too small to gain from more)")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "bench":
        from fastrlhf.bench.runner import main as command
    elif args.command == "demo":
        from fastrlhf.demo import main as command
    else:
        from fastrlhf.bench.verify import main as command
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
