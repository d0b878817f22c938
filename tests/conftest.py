"""Shared fixtures. No test touches a model hub: the environment is offline and the cache is private."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# Tiny models gain nothing from a second thread, and a 2-thread torch run slows ~100x when
# another process holds a core (STACK.md): tests run single-threaded.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture(scope="session", autouse=True)
def private_caches(tmp_path_factory):
    """HF and klalign caches in a temporary folder, so tests neither read nor pollute the user's."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["HF_HOME"] = str(cache / "hf")
    os.environ["HF_DATASETS_CACHE"] = str(cache / "hf" / "datasets")
    os.environ["KLALIGN_CACHE"] = str(cache / "klalign")
    return cache


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from klalign.models.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    from klalign.models.tiny import save_tiny_model

    return save_tiny_model("policy", tmp_path_factory.mktemp("tiny-policy"))


def run_script(args: list[str], cwd: Path = ROOT, timeout: int = 600):
    """Run a recipe or CLI the way a user does; returns the CompletedProcess (text)."""
    import subprocess

    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
    )
