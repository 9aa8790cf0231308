# The few targets people use. Each creates .venv if it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch first, so pip does not pull a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch<=2.14.1"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/llava-c demo

test: $(STAMP)
	bash scripts/run_tests.sh --durations=25

# The pure parts: no Ray cluster, no training (tests marked `integration` are left out).
test-fast: $(STAMP)
	bash scripts/run_tests.sh -m "not integration" --durations=10

lint: $(STAMP)
	$(BIN)/ruff check llava_c_ray tests bench
	$(BIN)/ruff format --check llava_c_ray tests bench

format: $(STAMP)
	$(BIN)/ruff format llava_c_ray tests bench
	$(BIN)/ruff check --fix llava_c_ray tests bench

clean:
	rm -rf $(VENV) .pytest_cache
