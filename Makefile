# Quick start: `make demo` runs the bundled model end to end, `make test` runs the tests.
# Both create .venv from the package registries on first use, with the versions the
# tests were validated against (constraints.txt; the ONNX backend pass list depends on them).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench fixtures clean

$(BIN)/hyperion: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,plot]' -c constraints.txt
	touch $(BIN)/hyperion

demo: $(BIN)/hyperion
	$(BIN)/hyperion demo

test: $(BIN)/hyperion
	$(BIN)/python -m pytest -q

bench: $(BIN)/hyperion
	$(BIN)/python benchmarks/compare.py

fixtures: $(BIN)/hyperion
	$(BIN)/python -m fixtures.generate

clean:
	rm -rf $(VENV) build *.egg-info
