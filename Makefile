# Everything runs inside .venv, created on first use from requirements*.txt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test test-fast benchmark clean-venv

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements-dev.txt
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

test: $(STAMP)  ## the whole suite, full-size SD2 UNet parity included
	$(BIN)/python -m pytest

test-fast: $(STAMP)  ## skip the tests that build full-size SD2 modules
	$(BIN)/python -m pytest -m "not slow"

benchmark: $(STAMP)  ## project UNet vs diffusers UNet, full SD2 size (minutes on a CPU)
	$(BIN)/python scripts/benchmark_unet.py

clean-venv:
	rm -rf $(VENV)
