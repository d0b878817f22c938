"""Per-prompt sampling jobs (RSO's data step, `BestOfNSampler`): spread over processes, written as they
finish, and reproducible after a kill.

Prompts are deduplicated by identity (`klalign.data.prompts.prompt_key`) and cut, in their given order,
into fixed groups of about `generation_batch_size` sequences. A group's samples are drawn with a
seed derived from (the run's seed, the identities of its prompts): the same group gives the same
samples whichever process draws it, whatever ran before it, and after a resume (a group with any
prompt left to do is drawn again whole; its finished prompts are simply not written twice).

Each wave hands every process one group. A process without one repeats the wave's last group and
drops the result, so that collectives inside the work (gathering ZeRO-3 weights for generation)
stay in lockstep. The main process receives the wave's results and writes each prompt's result at
once, so a killed run loses at most the groups in flight.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from klalign.data.prompts import prompt_key


def unique_prompts(prompts: list) -> dict[str, object]:
    """{key: prompt} in first-seen order; duplicates would only repeat the same work."""
    return {prompt_key(p): p for p in prompts}


def prompt_groups(keys: list[str], group_size: int) -> list[list[str]]:
    """Consecutive groups of `group_size` keys (at least one key each)."""
    group_size = max(1, group_size)
    return [keys[i : i + group_size] for i in range(0, len(keys), group_size)]


def run_groups(groups: list[list[str]], work: Callable[[list[str]], list], write: Callable[[list[str], list], None],
               desc: str = "sampling", progress: bool = True) -> None:
    """`work(group)` (one result per prompt key) on every process, `write(group, results)` on the main one."""
    state = PartialState()
    world, rank = state.num_processes, state.process_index
    waves = range(0, len(groups), world)
    for start in tqdm(waves, desc=desc, disable=not (progress and state.is_main_process)):
        wave = groups[start : start + world]
        results = work(wave[min(rank, len(wave) - 1)])
        mine = [(rank, results)] if rank < len(wave) else []
        done = gather_object(mine) if world > 1 else mine
        if state.is_main_process:
            for r, group_results in sorted(done, key=lambda item: item[0]):
                write(wave[r], group_results)


def append_lines(path: Path, lines: list[str]) -> None:
    """Append whole lines with one write, flushed: a kill leaves at most a torn last line."""
    if not lines:
        return
    with path.open("a") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file this module appended to; a torn last line (a kill mid-write) is
    dropped from the file, so it stays valid for every other reader."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return [json.loads(line) for line in lines]
    except json.JSONDecodeError:
        lines = lines[:-1]
        rewrite_lines(path, lines)
        return [json.loads(line) for line in lines]


def rewrite_lines(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)
