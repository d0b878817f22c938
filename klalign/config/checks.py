"""One set of input checks, shared by every trainer, recipe and tool, and run before any model loads;
and the one way a recipe reports bad input: one clear line on stderr and exit status 2.

Config classes call these from `__post_init__`, so a bad setting fails while the command line is
parsed. `run_recipe(main)` turns klalign's input errors (and any error raised while parsing the
config) into `<script>: error: <message>` and status 2; `KLALIGN_DEBUG=1` shows the traceback instead;
under a launcher it also ends the process with the launcher and closes the process group.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

from klalign.errors import INPUT_ERRORS, ConfigError


def check_beta(value: float, field: str = "beta") -> None:
    """beta, the KL coefficient, must be a positive number (beta <= 0 leaves the objective unregularised,
    and DPO's loss at beta = 0 is a constant log 2)."""
    if not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        raise ConfigError(f"{field} must be > 0 (the KL coefficient), got {value!r}")


def check_output_dir(path: str | os.PathLike | None, field: str = "output_dir") -> None:
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"{field} {str(path)!r} is a file, not a folder: choose a folder for the run's outputs")


# report_to integration -> the package it needs (transformers' own integrations need these installed)
INTEGRATION_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow",
                        "comet_ml": "comet_ml", "clearml": "clearml", "swanlab": "swanlab", "neptune": "neptune",
                        "dvclive": "dvclive", "codecarbon": "codecarbon", "azure_ml": "azureml", "flyte": "flytekit"}


def check_report_to(report_to) -> None:
    """Every integration named in `report_to` is installed (else transformers fails only once the
    Trainer, and so the model, is built)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in ("none", "all"):
            continue
        package = INTEGRATION_PACKAGES.get(name)
        if package is None:
            raise ConfigError(f"report_to: unknown integration {name!r}; choose from {sorted(INTEGRATION_PACKAGES)}")
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"report_to: {name!r} needs the {package!r} package, which is not installed "
                              f"(pip install {package}), or set report_to: none")


def check_training_config(args) -> None:
    """What every klalign training config checks (beta, output_dir, report_to)."""
    check_beta(args.beta)
    check_output_dir(args.output_dir)
    check_report_to(args.report_to)


def check_config_file(argv: list[str]) -> None:
    """`--config FILE` names a readable file."""
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.removeprefix("--config=")
        if arg == "--config" or arg.startswith("--config="):
            if not Path(path).is_file():
                raise ConfigError(f"--config {path}: no such file")


def run_recipe(main) -> None:
    """Run a recipe's `main()`; bad input ends it with one line on stderr and exit status 2.

    Under a launcher, the process dies with the launcher, and whether `main()` returns or raises, the process
    group is closed in an order that never waits on a departed process (`klalign.models.placement.run_launched`):
    a recipe neither waits for the others nor ends the group itself."""
    from klalign.models.placement import (
        run_launched,  # torch: not loaded by the light imports above
    )

    try:
        run_launched(main)
    except INPUT_ERRORS as error:
        if os.environ.get("KLALIGN_DEBUG", "") not in ("", "0"):
            raise
        if int(os.environ.get("RANK", "0")) == 0:  # every process meets the same bad input: say it once
            print(f"{Path(sys.argv[0]).name}: error: {error} (KLALIGN_DEBUG=1 shows the traceback)",
                  file=sys.stderr, flush=True)
        sys.exit(2)
