# Two commands do all the set-up on a fresh machine:
#   make demo   - the fault-injected demo (tiny GPT, 8 CPU ranks, one fault, a warm spare)
#   make test   - the test suite
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench setup clean

$(STAMP): pyproject.toml requirements-dev.txt Makefile
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	DS_BUILD_OPS=0 $(VENV)/bin/pip install -q --no-build-isolation deepspeed==0.19.8
	$(VENV)/bin/pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	WANDB_MODE=offline DS_ACCELERATOR=cpu $(VENV)/bin/fr-megatron demo

test: $(STAMP)
	WANDB_MODE=offline DS_ACCELERATOR=cpu $(VENV)/bin/python -m pytest -q tests

bench: $(STAMP)
	WANDB_MODE=offline DS_ACCELERATOR=cpu $(VENV)/bin/fr-megatron bench

clean:
	rm -rf $(VENV) runs wandb
