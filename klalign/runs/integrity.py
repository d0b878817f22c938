"""Checksums that let a resumed run trust what it reads: every checkpoint folder and every feedback
chunk is written with the sha256 of its bytes, and verified before anything is loaded from it.

A same-size corruption (zeroed bytes) and a truncated file both fail the check, which names the file.
The checksum list is written before the folder or chunk is renamed into place, so anything under
its final name carries one.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

CHECKSUMS = "checksums.sha256"  # in a checkpoint folder: "<sha256>  <relative path>" lines, as sha256sum writes


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(folder: str | Path) -> Path:
    """Record the sha256 of every file under `folder` (written last, atomically)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{file_sha256(p)}  {p.relative_to(folder).as_posix()}" for p in files]
    target = folder / CHECKSUMS
    tmp = target.with_name(f".{CHECKSUMS}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, target)
    return target


def verify_checksums(folder: str | Path) -> list[str]:
    """What is wrong with `folder`, one line per problem (empty: intact). Names each bad file."""
    folder = Path(folder)
    listing = folder / CHECKSUMS
    if not listing.is_file():
        return [f"{folder}: no {CHECKSUMS} (written by an older klalign, or the save did not finish)"]
    problems = []
    for line in listing.read_text().splitlines():
        expected, _, name = line.partition("  ")
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif file_sha256(path) != expected:
            problems.append(f"{path}: corrupt (sha256 differs from the one written with it)")
    return problems


def write_with_checksum(tmp: Path, final: Path) -> None:
    """Move a finished temporary file into place, its sha256 beside it (`<name>.sha256`) first."""
    sidecar = final.with_name(final.name + ".sha256")
    sidecar_tmp = sidecar.with_name(f".{sidecar.name}.tmp")
    sidecar_tmp.write_text(file_sha256(tmp) + "\n")
    os.replace(sidecar_tmp, sidecar)
    os.replace(tmp, final)


def verify_file(path: Path) -> str | None:
    """None if `path` matches the sha256 beside it, else what is wrong (naming the file)."""
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        return f"{path}: no checksum beside it ({sidecar.name})"
    if file_sha256(path) != sidecar.read_text().strip():
        return f"{path}: corrupt (sha256 differs from the one written with it)"
    return None


WEIGHT_FILE = re.compile(r"^(model|pytorch_model|adapter_model)([-.].*)?\.(safetensors|bin)$")


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model or adapter folder (safetensors or bin, sharded or not)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and WEIGHT_FILE.match(p.name))


def model_digest(folder: Path) -> str:
    """sha256 over the config and weight files of a model or adapter folder (names and contents)."""
    folder = Path(folder)
    files = [folder / n for n in ("config.json", "adapter_config.json") if (folder / n).is_file()]
    digest = hashlib.sha256()
    for path in files + weight_files(folder):
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()
