"""The `klalign` console script: one subcommand per tool.

    klalign theory --out runs/theory      # reproduce the papers' closed forms as tables and plots
    klalign evaluate --config configs/tiny/evaluate.yaml   # KL/reward trade-off of checkpoints
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with a `main(argv)` function, one-line description)
SUBCOMMANDS = {
    "theory": ("klalign.theory.reproduce", "Reproduce the papers' closed forms as Markdown tables and PNG plots."),
    "evaluate": ("klalign.evaluation.evaluate", "Reward vs KL of checkpoints against best-of-N and the tilted frontier."),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="klalign", description="KL-regularised alignment tools.")
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), help="; ".join(
        f"{name}: {desc}" for name, (_, desc) in sorted(SUBCOMMANDS.items())))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command = parser.parse_args(argv[:1]).command
    module = importlib.import_module(SUBCOMMANDS[command][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
