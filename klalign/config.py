"""Config parsing: one YAML file whose keys map 1:1 onto dataclass fields, plus CLI overrides.

    accelerate launch recipes/dpo.py --config configs/tiny/dpo.yaml --beta 0.2 --max_steps 10

Built on `trl.TrlParser`: an unknown YAML key is an error that names it, and every field's
help text is the one `--help` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import TrlParser


@dataclass
class DataArguments:
    """Which data to train and evaluate on. YAML keys map 1:1 onto these fields."""

    dataset_path: str | None = field(
        default=None, metadata={"help": "Training data: a JSON/JSONL/Parquet/CSV file or a save_to_disk folder."}
    )
    eval_dataset_path: str | None = field(default=None, metadata={"help": "Held-out data in the same format."})
    eval_fraction: float = field(
        default=0.0, metadata={"help": "Without eval_dataset_path, hold out this fraction of the training data."}
    )

    def __post_init__(self):
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")


def parse_config(*dataclass_types, args: list[str] | None = None):
    """Parse `--config file.yaml` and CLI overrides into one instance of each dataclass, in order."""
    return TrlParser(dataclass_types).parse_args_and_config(args=args)


def resume_checkpoint(value: str | None) -> str | bool | None:
    """`resume_from_checkpoint` as `Trainer.train` wants it: "true"/"last" means the latest checkpoint."""
    if isinstance(value, str) and value.lower() in ("true", "last"):
        return True
    return value
