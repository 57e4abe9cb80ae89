# Quick start: `make demo` runs the bundled model end to end, `make test` runs lint and the tests.
# Both create .venv from the package registries on first use, with the versions the
# tests were validated against (constraints.txt; the ONNX backend pass list depends on them).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LINTED := hyperion passes tests benchmarks fixtures examples corpus setup.py

.PHONY: demo test lint bench fixtures corpus wheel clean docs-images fuzz

$(BIN)/hyperion: pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,plot]' -c constraints.txt
	touch $(BIN)/hyperion

demo: $(BIN)/hyperion
	$(BIN)/hyperion demo

test: lint
	$(BIN)/python -m pytest -q

# The long fuzzing run (`make test` runs the same strategies with a few derandomized examples):
# hypothesis with FUZZ_EXAMPLES examples per strategy and fresh randomness, then atheris
# (coverage-guided, over model bytes) for FUZZ_SECONDS when it installs from a wheel here.
# Address space is capped (FUZZ_VMEM_KB): a random graph may ask onnxruntime for any amount of
# memory at run time (Expand, ConstantOfShape), which must fail as an error, not OOM the machine.
FUZZ_EXAMPLES ?= 2000
FUZZ_SECONDS ?= 600
FUZZ_VMEM_KB ?= 8000000
fuzz: $(BIN)/hyperion
	ulimit -v $(FUZZ_VMEM_KB) && HYPERION_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
		$(BIN)/python -m pytest -q -p no:cacheprovider --hypothesis-show-statistics tests/test_fuzz.py
	$(BIN)/python -m pip install --quiet atheris && ulimit -v $(FUZZ_VMEM_KB) && \
		$(BIN)/python -m tests.fuzz_atheris -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 \
		|| echo "atheris run skipped or failed (see above)"

lint: $(BIN)/hyperion
	$(BIN)/ruff check $(LINTED)

bench: $(BIN)/hyperion
	$(BIN)/python benchmarks/compare.py

# docs/images/: a measured trace of the bundled demo model, its picture and the memory timeline.
docs-images: $(BIN)/hyperion
	$(BIN)/python -m hyperion.tools.trace_image docs/images

fixtures: $(BIN)/hyperion
	$(BIN)/python -m fixtures.generate

# The real-architecture corpus in corpus/models (corpus/README.md): random weights, exported with
# torch and transformers, which are installed here on first use and never by `make test`.
corpus: $(BIN)/hyperion
	$(BIN)/python -c "import torch, torchvision, transformers" 2>/dev/null || \
		$(BIN)/python -m pip install --quiet -e '.[corpus]' -c constraints.txt
	$(BIN)/python -m corpus --out corpus/models

# The installable wheel, in dist/ (what .ci/run installs into a throw-away venv).
wheel: $(BIN)/hyperion
	rm -rf dist build *.egg-info
	$(BIN)/python -m pip wheel --quiet --no-deps -w dist .

clean:
	rm -rf $(VENV) build dist *.egg-info
