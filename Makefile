# Every target bootstraps .venv when it is missing, so each works on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_WORKERS ?= 2  # pytest-xdist processes (one torch thread each); whole test files go to one worker

.PHONY: install demo test test-fast bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q "pip<26" "setuptools<81" wheel
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev,demo]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m osediff_lab.train +experiment=demo resume=false

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=12

# The unit tests: no end-to-end runs (marked slow: training, CLI subprocesses, DDP) and no Slurm; for iterating on a method.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow and not slurm" --durations=5

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py $(BENCH)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf outputs multirun .pytest_cache
