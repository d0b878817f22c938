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
    assert proc.returncode == 2
    assert "error: " in proc.stderr and "bad.jsonl" in proc.stderr and "row 1" in proc.stderr
    assert "Traceback" not in proc.stderr  # one clear message, not a traceback
    assert not (cache / "tiny").exists()  # no model was built or loaded


def test_unknown_config_key_is_named(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: tiny:policy\nbetaa: 0.1\n")
    proc = run_script(["recipes/dpo.py", "--config", str(config)])
    assert proc.returncode == 2 and "betaa" in proc.stderr


def bad_input(tmp_path, recipe, config, *args, env=None):
    """Run a recipe on bad input with a fresh model cache: (exit status, stderr lines, whether a model was built)."""
    cache = tmp_path / "cache"
    saved = os.environ["KLALIGN_CACHE"]
    os.environ["KLALIGN_CACHE"] = str(cache)
    try:
        proc = run_script([recipe, "--config", config, "--output_dir", str(tmp_path / "run"), *args])
    finally:
        os.environ["KLALIGN_CACHE"] = saved
    return proc.returncode, [line for line in proc.stderr.splitlines() if line.strip()], (cache / "tiny").exists()


@pytest.mark.parametrize("recipe, config, args, message", [
    ("recipes/dpo.py", "configs/tiny/dpo.yaml", ["--beta", "0"], "beta must be > 0"),
    ("recipes/dpo.py", "configs/tiny/dpo.yaml", ["--beta", "-0.1"], "beta must be > 0"),
    ("recipes/iterative_dpo.py", "configs/tiny/iterative_dpo.yaml", ["--beta", "0"], "beta must be > 0"),
    ("recipes/rso.py", "configs/tiny/rso.yaml", ["--sampling_beta", "0"], "sampling_beta must be > 0"),
    ("recipes/dpo.py", "configs/tiny/dpo.yaml", ["--report_to", "wandb"], "'wandb' needs the 'wandb' package"),
    ("recipes/nash_mp.py", "configs/tiny/nash_mp.yaml", ["--report_to", "trackio"], "'trackio' needs"),
    ("recipes/dpo.py", "configs/does_not_exist.yaml", [], "--config configs/does_not_exist.yaml: no such file"),
])
def test_bad_input_is_one_line_and_status_2_before_any_model_loads(recipe, config, args, message, tmp_path):
    status, lines, built = bad_input(tmp_path, recipe, config, *args)
    assert status == 2 and len(lines) == 1 and message in lines[0], lines
    assert not built


def test_an_output_dir_that_is_a_file_is_refused_before_any_model_loads(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    status, lines, built = bad_input(tmp_path, "recipes/iterative_dpo.py", "configs/tiny/iterative_dpo.yaml")
    assert status == 2 and len(lines) == 1 and "is a file" in lines[0] and not built


@pytest.mark.parametrize("mode, expected", [("error", "row(s) have 'chosen' identical to 'rejected'"),
                                            ("drop", "dropped 4 of")])
def test_pairs_with_chosen_equal_to_rejected_are_refused_or_dropped(mode, expected, tmp_path):
    rows = [{"prompt": "Hi", "chosen": " yes", "rejected": " no"}, {"prompt": "Yo", "chosen": " a", "rejected": " a"},
            {"prompt": "So", "chosen": " b", "rejected": " b"}] * 2
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from klalign import DataError, load_preference_dataset

    if mode == "error":
        with pytest.raises(DataError, match=r"4 row\(s\).*rows are 0-based\): 1, 2, 4, 5"):
            load_preference_dataset(data)
    else:
        proc = run_script(["recipes/dpo.py", "--config", "configs/tiny/dpo.yaml", "--dataset_path", str(data),
                           "--eval_dataset_path", str(data), "--identical_pairs", "drop", "--max_steps", "1",
                           "--output_dir", str(tmp_path / "run")])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "dropped 4 of 6 rows" in proc.stderr


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


CONFIGS = sorted(str(p.relative_to(ROOT)) for folder in ("quickstart", "tiny", "smollm2", "gpu-7b")
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
    from klalign.config.parsing import parse_config
    from klalign.evaluation.evaluate import EvaluationArguments
    from klalign.generation.types import GenerationArguments

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


def _flat(d, prefix=""):
    out = {}
    for key, value in (d or {}).items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


# What a CPU cannot take from a GPU launch config: mixed precision (bf16 needs a GPU here), the device,
# and the process and machine layout. The DeepSpeed settings are one shared file.
CPU_ONLY_KEYS = {"mixed_precision", "use_cpu", "num_processes", "num_machines", "machine_rank", "main_process_ip",
                 "main_process_port"}


@pytest.mark.parametrize("gpu", ["zero3.yaml", "multinode_zero3.yaml"])
def test_cpu_zero3_config_mirrors_the_gpu_configs(gpu):
    """The CPU test matrix runs the GPU users' DeepSpeed settings (zero3_init_flag included)."""
    import yaml

    cpu = _flat(yaml.safe_load((ROOT / "configs/accelerate/cpu_zero3.yaml").read_text()))
    ours = _flat(yaml.safe_load((ROOT / "configs/accelerate" / gpu).read_text()))
    differ = {k for k in set(cpu) | set(ours) if cpu.get(k) != ours.get(k)}
    assert differ <= CPU_ONLY_KEYS, sorted(differ - CPU_ONLY_KEYS)
    assert ours["deepspeed_config.zero3_init_flag"] is True and cpu["deepspeed_config.zero3_init_flag"] is True


@pytest.mark.slow
def test_smollm2_rso_config_runs_end_to_end(tmp_path):
    """The README's SmolLM2 RSO line, as shipped but smaller (8 candidates, 1 epoch: the benchmark's 34 and 4 take
    ~30 min): conversational prompts, so the pairs it writes are conversations with assistant-message responses,
    which its own loader then reads and trains on."""
    proc = run_script(["recipes/rso.py", "--config", "configs/smollm2/rso.yaml", "--output_dir", str(tmp_path / "run"),
                       "--num_candidates", "8", "--num_train_epochs", "1"], timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "rso_pairs.jsonl").read_text().splitlines()]
    assert rows and isinstance(rows[0]["prompt"], list) and rows[0]["chosen"][0]["role"] == "assistant"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]
    assert summary["pairs_in_file"] == len(rows) and summary["train_loss"] is not None


def test_bad_input_under_accelerate_launch_is_one_klalign_line_and_status_2(tmp_path):
    """The recipe prints one line and exits 2; accelerate's launcher then reports the child's status its own way."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu.yaml",
         "recipes/dpo.py", "--config", "configs/tiny/dpo.yaml", "--beta", "0", "--output_dir", str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    ours = [line for line in proc.stderr.splitlines() if line.startswith("dpo.py: error:")]
    assert len(ours) == 1 and "beta must be > 0" in ours[0]
    assert "returned non-zero exit status 2" in proc.stderr  # the recipe's own status, as the launcher saw it
    assert "File \"/" not in proc.stderr.split("dpo.py: error:")[0]  # no traceback from the recipe before it


def test_every_public_name_is_documented_in_the_readme():
    import klalign

    readme = (ROOT / "README.md").read_text()
    assert [name for name in klalign.__all__ if f"`{name}`" not in readme] == []
