"""Where a resumed online run starts: the newest intact round checkpoint, after every stored feedback
chunk has been verified (`klalign.runs.integrity`), before anything is loaded or sampled.

- A checkpoint whose files do not match their checksums (truncated, or corrupted in place at the same
  size) is skipped, with a message naming the file; the next older intact one is used.
- A corrupt feedback chunk of round r is moved aside (`*.corrupt`) and collected again, with the same
  seeds, when round r replays: so the start must be a checkpoint from before round r. That gives the
  same rows only when the oracle answers the same query the same way (`oracle.reproducible`); with an
  oracle that does not, the run stops and says so instead of mixing in different feedback.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from klalign.errors import ResumeError
from klalign.runs.integrity import verify_checksums

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-round-(\d+)$")



@dataclass
class ResumePlan:
    """The checkpoint to load (None: start at round 0, reusing intact stored chunks) and what was found."""

    checkpoint: str | None
    notes: list[str] = field(default_factory=list)
    recollect: list[str] = field(default_factory=list)  # chunk files moved aside, to be collected again

    @property
    def start_round(self) -> int:
        return 0 if self.checkpoint is None else round_of(self.checkpoint) + 1


def round_of(checkpoint: str | Path) -> int:
    return int(CHECKPOINT_PATTERN.match(Path(checkpoint).name).group(1))


def round_checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoint-round-* folders of a run, newest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-round-*") if CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=round_of, reverse=True)


def plan_resume(output_dir: str | Path, requested: str | bool | None, store, reproducible: bool) -> ResumePlan:
    """Verify the store and the checkpoints, and choose where to resume (see the module docstring).

    `requested`: True / "true" / "last" for the newest intact checkpoint, or a checkpoint folder.
    """
    notes: list[str] = []
    corrupt = store.verify()  # {round: {chunk: problem}}
    if corrupt and not reproducible:
        problems = "; ".join(p for round_problems in corrupt.values() for p in round_problems.values())
        raise ResumeError(
            f"stored feedback is corrupt ({problems}) and the oracle may answer the same query differently, so "
            "collecting it again would not give the rows the run trained on. Restore the files from a backup, or "
            "start a new run.")
    first_bad = min(corrupt) if corrupt else None
    recollect = []
    for round_index, problems in sorted(corrupt.items()):
        notes += [f"{p}; moved aside, it will be collected again with the same seeds" for p in problems.values()]
        store.quarantine(list(problems))
        recollect += [str(path) for path in problems]
    if isinstance(requested, str) and requested.lower() not in ("true", "last"):
        folder = Path(requested)
        if not folder.is_dir():
            raise ResumeError(f"resume_from_checkpoint: {requested} is not a folder")
        problems = verify_checksums(folder)
        if problems:
            raise ResumeError(f"resume_from_checkpoint: {requested} is damaged: " + "; ".join(problems))
        if first_bad is not None and round_of(folder) >= first_bad:
            raise ResumeError(f"resume_from_checkpoint: {requested} comes after round {first_bad}, whose stored "
                              "feedback was corrupt; resume from an earlier checkpoint (or `true`)")
        return ResumePlan(str(folder), notes, recollect)
    for folder in round_checkpoints(output_dir):
        if first_bad is not None and round_of(folder) >= first_bad:
            notes.append(f"{folder.name} comes after round {first_bad}, whose feedback is collected again: skipped")
            continue
        problems = verify_checksums(folder)
        if not problems:
            return ResumePlan(str(folder), notes, recollect)
        notes.append(f"{folder.name} is damaged ({'; '.join(problems)}): skipped, trying an older checkpoint")
    return ResumePlan(None, notes, recollect)


def describe(plan: ResumePlan, store, num_rounds: int) -> str:
    """One paragraph for the log: where the run resumes and what it reuses."""
    chunks = store.num_chunks()
    where = (f"resuming from {Path(plan.checkpoint).name} (round {plan.start_round} of {num_rounds} next)"
             if plan.checkpoint else "resuming from the start (no intact checkpoint)")
    lines = [f"klalign: {where}; {chunks} stored feedback chunk(s) are reused, not asked again"]
    lines += [f"klalign:   {note}" for note in plan.notes]
    return os.linesep.join(lines)
