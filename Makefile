# Two commands: `make demo` runs the quickstart, `make test` runs the test suite.
# Both create .venv when missing and install torch 2.13.0 (CPU build), then cardkit.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install bench mutation clean

demo: $(STAMP)
	$(BIN)/cardkit run configs/quickstart.yaml

# Two test processes of one torch thread each (pytest-xdist), a test file per process at a time so
# that a file's module-scoped runs happen once; TEST_JOBS=N for another count.
TEST_JOBS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile

# The inner loop: everything but the end-to-end and statistical tests marked slow (`make test`
# and CI run those too).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile -m "not slow"

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

# Mutation testing with mutmut 3 (configured in pyproject.toml's [tool.mutmut]); not part of
# `make test`. It mutates attacks/, certify/, prune/, compress/ and corrupt/ and runs the fast
# tests of those packages against each mutant, on one worker and one thread (MUTATION_JOBS=N for
# more); mutants/ keeps the results, so a second run only retests what changed.
# `make mutation PACKAGE=compress` runs one package's mutants.
MUTATION_JOBS ?= 1
mutation: $(STAMP)
	$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/python -m pip install -e '.[mutation]'
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTATION_JOBS) $(if $(PACKAGE),'cardkit.$(PACKAGE).*')
	$(BIN)/mutmut results

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs build mutants src/*.egg-info
