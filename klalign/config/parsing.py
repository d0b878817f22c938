"""Config parsing: one YAML file whose keys map 1:1 onto dataclass fields, plus CLI overrides.

    accelerate launch recipes/dpo.py --config configs/tiny/dpo.yaml --beta 0.2 --max_steps 10

Built on `trl.TrlParser`: an unknown YAML key is an error that names it, and every field's
help text is the one `--help` prints.
"""

from __future__ import annotations

import sys

from trl import TrlParser

from klalign.config.checks import check_config_file
from klalign.errors import ConfigError


def parse_config(*dataclass_types, args: list[str] | None = None):
    """Parse `--config file.yaml` and CLI overrides into one instance of each dataclass, in order.

    Anything wrong with them (a missing config file, an unknown key, a bad value) is a `ConfigError`."""
    argv = sys.argv[1:] if args is None else args
    check_config_file(argv)
    try:
        return TrlParser(dataclass_types).parse_args_and_config(args=args)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:  # every check in the config classes' __post_init__
        raise ConfigError(str(error)) from error


def resume_checkpoint(value: str | None) -> str | bool | None:
    """`resume_from_checkpoint` as `Trainer.train` wants it: "true"/"last" means the latest checkpoint."""
    if isinstance(value, str) and value.lower() in ("true", "last"):
        return True
    return value
