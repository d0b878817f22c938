"""The on-disk record of collected feedback: nothing an oracle answered is ever lost.

Layout under the store's folder:

    manifest.json                    the settings that determine what was collected (klalign.runs.manifest)
    round-00003/part-00000.parquet   rows of one collection chunk (written atomically)
    round-00003/part-00000.parquet.sha256   its checksum, written before the chunk is renamed into place
    round-00003/part-00001.parquet
    round-00003/COMPLETE             the round's collection finished

A chunk is written to a temporary name and renamed, so a run killed at any point leaves only whole
chunks, each with its checksum (`verify` checks them all before a resumed run samples anything). On
resume, the online loop asks `chunk(round, i)` before generating chunk i: a stored chunk is reused,
never re-queried. Rows are plain dicts of strings and numbers (one schema per trainer) and include
which policy produced them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, concatenate_datasets

from klalign.runs.integrity import verify_file, write_with_checksum


class FeedbackStore:
    """Rounds of collected rows, chunk by chunk, in `directory`."""

    def __init__(self, directory: str | Path, read_only: bool = False):
        self.directory = Path(directory)
        if not read_only:
            self.directory.mkdir(parents=True, exist_ok=True)

    def _round_dir(self, round_index: int) -> Path:
        return self.directory / f"round-{round_index:05d}"

    def _chunk_path(self, round_index: int, chunk_index: int) -> Path:
        return self._round_dir(round_index) / f"part-{chunk_index:05d}.parquet"

    def chunk(self, round_index: int, chunk_index: int) -> list[dict] | None:
        """The stored rows of one chunk, or None if it was never written."""
        path = self._chunk_path(round_index, chunk_index)
        return pq.read_table(path).to_pylist() if path.exists() else None

    def write_chunk(self, round_index: int, chunk_index: int, rows: list[dict]) -> Path:
        """Write one chunk atomically (temporary file + rename)."""
        if not rows:
            raise ValueError(f"round {round_index} chunk {chunk_index}: refusing to store an empty chunk")
        path = self._chunk_path(round_index, chunk_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        write_with_checksum(tmp, path)
        return path

    def mark_complete(self, round_index: int) -> None:
        self._round_dir(round_index).mkdir(parents=True, exist_ok=True)  # a round may have collected nothing
        (self._round_dir(round_index) / "COMPLETE").touch()

    def is_complete(self, round_index: int) -> bool:
        return (self._round_dir(round_index) / "COMPLETE").exists()

    def rounds(self) -> list[int]:
        """Indices of the rounds whose collection finished."""
        found = sorted(int(p.name.split("-")[1]) for p in self.directory.glob("round-*") if p.is_dir())
        return [r for r in found if self.is_complete(r)]

    def round_rows(self, round_index: int) -> list[dict]:
        """Every stored row of one round, in chunk order."""
        parts = sorted(self._round_dir(round_index).glob("part-*.parquet"))
        return [row for part in parts for row in pq.read_table(part).to_pylist()]

    def dataset(self, rounds: list[int] | None = None) -> Dataset:
        """The rows of the given rounds (default: every completed round) as one `datasets.Dataset`."""
        rounds = self.rounds() if rounds is None else rounds
        parts = [Dataset.from_list(self.round_rows(r)) for r in rounds]
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError(f"feedback store {self.directory} has no rows for rounds {rounds}")
        return concatenate_datasets(parts)

    def num_rows(self) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.directory.glob("round-*/part-*.parquet"))

    def num_chunks(self) -> int:
        return len(list(self.directory.glob("round-*/part-*.parquet")))

    def has_data(self) -> bool:
        return self.num_chunks() > 0

    def verify(self) -> dict[int, dict[Path, str]]:
        """{round: {bad chunk: what is wrong}}, every stored chunk checked against its checksum. A chunk
        from a klalign that wrote no checksums passes if it can be read whole."""
        bad: dict[int, dict[Path, str]] = {}
        for path in sorted(self.directory.glob("round-*/part-*.parquet")):
            problem = verify_file(path)
            if problem is not None and not path.with_name(path.name + ".sha256").exists():
                try:
                    pq.read_table(path)
                    problem = None
                except Exception as error:  # any unreadable file is corrupt
                    problem = f"{path}: unreadable ({type(error).__name__}: {error})"
            if problem is not None:
                bad.setdefault(int(path.parent.name.split("-")[1]), {})[path] = problem
        return bad

    def quarantine(self, chunks: list[Path]) -> None:
        """Move bad chunks aside (`*.corrupt`) so that they are collected again; their rounds are no
        longer complete."""
        for path in chunks:
            os.replace(path, path.with_name(path.name + ".corrupt"))
            (path.parent / "COMPLETE").unlink(missing_ok=True)
