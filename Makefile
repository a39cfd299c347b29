# Two commands: `make demo` runs the quickstart, `make test` runs the test suite.
# Both create .venv when missing and install torch 2.13.0 (CPU build), then cardkit.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

demo: $(STAMP)
	$(BIN)/cardkit run configs/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

install: $(STAMP)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_attack.py
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_masked.py
	$(BIN)/python benchmarks/bench_structured.py
	$(BIN)/python benchmarks/bench_bounds.py
	$(BIN)/python benchmarks/bench_smoothing.py
	$(BIN)/python benchmarks/bench_corruptions.py
	$(BIN)/python benchmarks/bench_augmix.py
	$(BIN)/python benchmarks/bench_deck.py
	$(BIN)/python benchmarks/bench_artifact.py
	$(BIN)/python benchmarks/bench_atmc.py
	$(BIN)/python benchmarks/bench_checkpoint_load.py
	$(BIN)/python benchmarks/bench_autoattack.py
	$(BIN)/python benchmarks/bench_api.py

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs build src/*.egg-info
