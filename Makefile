# The few targets people use. Each creates .venv if it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# lmms-eval lives in a venv of its own: it moves filelock, protobuf and python-dateutil back a
# major version, and the CPU default stays light (docs/lmms-eval.md).
EVAL_VENV := .venv-eval
EVAL_STAMP := $(EVAL_VENV)/.installed
COMMA := ,

.PHONY: demo test test-fast test-eval lint format clean

# A venv at $(1) with the CPU wheel of torch first (so pip does not pull a multi-GB CUDA build),
# then this project with the extras $(2). -qq: errors only (this machine's pip set-up warns per
# package about index folders it lacks).
define make_venv
	test -d $(1) || $(PY) -m venv $(1)
	$(1)/bin/pip install -qq --upgrade pip
	$(1)/bin/pip install -qq "torch==2.13.0" || $(1)/bin/pip install -qq "torch<=2.14.1"
	$(1)/bin/pip install -qq -e ".[$(2)]"
endef

$(STAMP): pyproject.toml
	$(call make_venv,$(VENV),dev)
	touch $(STAMP)

$(EVAL_STAMP): pyproject.toml
	$(call make_venv,$(EVAL_VENV),dev$(COMMA)eval)
	@# PyPI's torchvision is a CUDA build, which does not load beside the CPU torch: remove it there.
	$(EVAL_VENV)/bin/python -c "import torch, sys; sys.exit(torch.version.cuda is None)" \
		|| $(EVAL_VENV)/bin/pip uninstall -qq -y torchvision
	touch $(EVAL_STAMP)

demo: $(STAMP)
	$(BIN)/llava-c demo

# The suite, then the lmms-eval tests (marked `lmms`) in the eval venv.
test: $(STAMP) $(EVAL_STAMP)
	bash scripts/run_tests.sh -m "not lmms" --durations=25
	VENV=$(EVAL_VENV) bash scripts/run_tests.sh -m lmms --durations=5

test-eval: $(EVAL_STAMP)
	VENV=$(EVAL_VENV) bash scripts/run_tests.sh -m lmms --durations=5

# The pure parts: no Ray cluster, no training (tests marked `integration` are left out).
test-fast: $(STAMP)
	bash scripts/run_tests.sh -m "not integration and not lmms" --durations=10

lint: $(STAMP)
	$(BIN)/ruff check llava_c_ray tests bench
	$(BIN)/ruff format --check llava_c_ray tests bench

format: $(STAMP)
	$(BIN)/ruff format llava_c_ray tests bench
	$(BIN)/ruff check --fix llava_c_ray tests bench

clean:
	rm -rf $(VENV) $(EVAL_VENV) .pytest_cache
