"""Round checkpoints of the online trainers: written whole or not at all.

Model, optimizer, scheduler and trainer state go to a temporary folder, are checksummed
(`klalign.runs.integrity`), then renamed: a folder under its final name is whole and verifiable, and a
killed run resumes from the last one (`klalign.runs.resume`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from transformers.utils import logging as hf_logging

from klalign.runs.integrity import write_checksums
from klalign.runs.resume import round_checkpoints


def save_round_checkpoint(trainer, round_index: int) -> None:
    """Model, optimizer, scheduler and trainer state, written to a temporary folder, checksummed, then
    renamed: a folder under its final name is whole and verifiable (klalign.runs.integrity)."""
    final = Path(trainer.args.output_dir) / f"checkpoint-round-{round_index:05d}"
    tmp = final.with_name(f".tmp-{final.name}")
    if trainer.args.should_save and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    with quiet_saving():
        trainer.save_model(str(tmp), _internal_call=True)  # private: klalign.internals
        trainer._save_optimizer_and_scheduler(str(tmp))  # private: klalign.internals
    trainer.accelerator.wait_for_everyone()  # every process has written its shards before the checksums
    if trainer.args.should_save:
        trainer.state.save_to_json(str(tmp / "trainer_state.json"))
        (tmp / "online_round.json").write_text(json.dumps({"round": round_index}))
        write_checksums(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        rotate_round_checkpoints(trainer.args.output_dir, trainer.args.save_total_limit)
    trainer.accelerator.wait_for_everyone()


def rotate_round_checkpoints(output_dir, limit: int | None) -> None:
    if not limit:
        return
    for old in round_checkpoints(output_dir)[limit:]:  # newest first
        shutil.rmtree(old, ignore_errors=True)


class quiet_saving:
    """Saving prints nothing unless something is wrong: no "Writing model shards" bars, no deprecation
    warnings that transformers and DeepSpeed repeat at every save."""

    def __enter__(self):
        import warnings

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        self._bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        if self._bars:
            hf_logging.enable_progress_bar()
        self._warnings.__exit__(*exc)
