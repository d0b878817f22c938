"""A launched process's life, in one process: `close_distributed` ends the process group in the order that
cannot wait on a departed peer, and `exit_with_launcher` asks the kernel to end the process with its
launcher. The launched versions (2 processes, the launcher killed) are in tests/test_distributed.py."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT
from torch.nn.parallel import DistributedDataParallel

from klalign.models.placement import close_distributed, exit_with_launcher

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux's")


def gloo_threads() -> list[str]:
    """The names of this process's threads that belong to a gloo process group (workers and the TCP loop)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as file:
                names.append(file.read().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return sorted(name for name in names if "gloo" in name)


def test_close_distributed_is_a_no_op_without_a_process_group():
    assert not dist.is_initialized()
    assert close_distributed(timeout=1) is True
    assert not dist.is_initialized()


@linux_only
def test_close_distributed_drops_the_reducer_and_ends_a_one_process_gloo_group(tmp_path):
    before = gloo_threads()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        kept = [DistributedDataParallel(torch.nn.Linear(2, 2))]  # outlives the run: gc alone cannot free it

        def barrier(group=dist.group.WORLD):  # captured at definition, as DeepSpeed's TorchBackend.barrier does
            return group

        assert len(gloo_threads()) > len(before)
        assert close_distributed(timeout=30) is True
        assert not dist.is_initialized()
        assert not {"reducer", "logger", "process_group"} & set(kept[0].__dict__)
        assert barrier.__defaults__ == (None,)
        assert gloo_threads() == before  # the group's destructor ran inside close_distributed: threads joined
        assert torch.equal(kept[0].module(torch.ones(1, 2)), kept[0].module(torch.ones(1, 2)))  # the model stays
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


PROBE = textwrap.dedent("""
    import ctypes, sys
    from klalign.models.placement import exit_with_launcher
    asked = exit_with_launcher()
    value = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(2, ctypes.byref(value), 0, 0, 0)  # PR_GET_PDEATHSIG
    print(asked, value.value)
""")


def probe(env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**clean, **env}, capture_output=True,
                          text=True, timeout=120)


@linux_only
def test_exit_with_launcher_asks_for_sigterm_only_under_a_launcher():
    assert exit_with_launcher() is False  # this test process: no launcher
    alone = probe({})
    assert alone.stdout.split() == ["False", "0"], alone.stderr
    launched = probe({"LOCAL_RANK": "0"})
    assert launched.stdout.split() == ["True", str(int(signal.SIGTERM))], launched.stderr


@linux_only
def test_a_process_whose_launcher_is_already_gone_ends_itself(tmp_path):
    """The parent exits before the child asks (the child is then init's): no signal would ever come, so
    `exit_with_launcher` sends it."""
    from klalign.models.placement import _is_a_launcher

    if _is_a_launcher(1):
        pytest.skip("PID 1 here is a Python process or launcher: an orphan cannot be told from a launched child")
    asked, survived = tmp_path / "asked", tmp_path / "survived"
    child = (f"import time; time.sleep(1); from klalign.models.placement import exit_with_launcher; "
             f"open({str(asked)!r}, 'w').close(); exit_with_launcher(); open({str(survived)!r}, 'w').close()")
    parent = f"import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', {child!r}]).pid)"  # exits at once
    clean = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    pid = int(subprocess.run([sys.executable, "-c", parent], cwd=ROOT, env={**clean, "LOCAL_RANK": "0"}, timeout=60,
                             check=True, capture_output=True, text=True).stdout)
    deadline = time.monotonic() + 300
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:  # init reaps it once it ends
        time.sleep(0.5)
    assert asked.exists() and not survived.exists()


def test_run_launched_returns_or_reraises_with_the_failed_run_freed_before_the_group_closes(monkeypatch):
    import weakref

    from klalign.models import placement

    assert placement.run_launched(lambda value: value + 1, 2) == 3

    class Trainer:
        pass

    alive, at_close = [], []
    monkeypatch.setattr(placement, "close_distributed", lambda timeout=None: at_close.append(alive[0]()) or True)

    def main():
        trainer = Trainer()
        alive.append(weakref.ref(trainer))
        raise RuntimeError("failed")

    with pytest.raises(RuntimeError, match="failed"):
        placement.run_launched(main)
    assert at_close == [None]  # main's locals were gone when the group closed, though its exception was alive
