"""The shipped recipes run with their shipped configs and tiny overrides, as a user runs them."""

import importlib.util
import json
import os
import re

import pytest

from conftest import ROOT, run_script


def tiny_overrides(tmp_path, *extra):
    return ["--output_dir", str(tmp_path / "run"), "--logging_steps", "1", *extra]


def test_dpo_recipe_trains_saves_and_summarises(tmp_path):
    proc = run_script(["recipes/dpo.py", "--config", "configs/tiny/dpo.yaml",
                       *tiny_overrides(tmp_path, "--max_steps", "4", "--save_steps", "2")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics"]["eval_loss"] > 0
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert (tmp_path / "run" / "checkpoint-4").is_dir()
    assert "summary.json" in proc.stdout

    # Resume from the last checkpoint and go on to step 6: the trainer state continues, not restarts.
    proc = run_script(["recipes/dpo.py", "--config", "configs/tiny/dpo.yaml",
                       *tiny_overrides(tmp_path, "--max_steps", "6", "--save_steps", "2",
                                       "--resume_from_checkpoint", "true")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert [e["step"] for e in state["log_history"] if "loss" in e][:6] == [1, 2, 3, 4, 5, 6]


def test_bad_data_fails_before_any_model_is_loaded(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi", "chosen": " yes", "rejected": " no"}\n{"prompt": "Yo", "chosen": ""}\n')
    cache = tmp_path / "cache"
    env_cache = os.environ["KLALIGN_CACHE"]
    os.environ["KLALIGN_CACHE"] = str(cache)
    try:
        proc = run_script(["recipes/dpo.py", "--config", "configs/tiny/dpo.yaml",
                           "--dataset_path", str(bad), *tiny_overrides(tmp_path)])
    finally:
        os.environ["KLALIGN_CACHE"] = env_cache
    assert proc.returncode != 0
    assert "DataError" in proc.stderr and "bad.jsonl" in proc.stderr and "row 1" in proc.stderr
    assert not (cache / "tiny").exists()  # no model was built or loaded


def test_unknown_config_key_is_named(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: tiny:policy\nbetaa: 0.1\n")
    proc = run_script(["recipes/dpo.py", "--config", str(config)])
    assert proc.returncode != 0 and "betaa" in proc.stderr


def test_rso_recipe_samples_pairs_and_trains(tmp_path):
    proc = run_script(["recipes/rso.py", "--config", "configs/tiny/rso.yaml",
                       *tiny_overrides(tmp_path, "--num_candidates", "6", "--max_new_tokens", "6",
                                       "--num_train_epochs", "1", "--sampling_beta", "1.0")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]
    assert summary["candidates"] == 40 * 6 and 0 < summary["acceptance_rate"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "rso_pairs.jsonl").read_text().splitlines()]
    assert rows and all(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    assert (tmp_path / "run" / "model.safetensors").exists()


CONFIGS = sorted(str(p.relative_to(ROOT)) for folder in ("tiny", "smollm2", "gpu-7b")
                 for p in (ROOT / "configs" / folder).glob("*.yaml"))


def recipe_config_types(recipe: str):
    """The dataclasses a recipe parses its YAML into (its module-level CONFIG_TYPES)."""
    spec = importlib.util.spec_from_file_location("recipe", ROOT / recipe)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines main() without running it
    return module.CONFIG_TYPES


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_starts_with_its_command_and_parses(config):
    """Each shipped config names the command that runs it, and every key maps onto a field."""
    from klalign.config import parse_config
    from klalign.evaluation import EvaluationArguments
    from klalign.generation import GenerationArguments

    first = (ROOT / config).read_text().splitlines()[0]
    if first.startswith("# klalign evaluate"):
        assert first == f"# klalign evaluate --config {config}"
        types = (EvaluationArguments, GenerationArguments)
    else:
        match = re.fullmatch(r"# accelerate launch --config_file \S+ (recipes/\w+\.py) --config (\S+)", first)
        assert match and match.group(2) == config, first
        types = recipe_config_types(match.group(1))
    overrides = [] if types[0] is EvaluationArguments else ["--bf16", "false", "--use_cpu", "true"]
    parsed = parse_config(*types, args=["--config", config, *overrides])
    assert len(parsed) == len(types)
