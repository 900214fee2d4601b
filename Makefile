# Everything runs from a fresh clone: the first target that needs it creates .venv and installs the
# package with its pinned dependencies (constraints.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: venv test bench train gpu-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch first and on its own, so that no later package resolves torch to a CUDA build.
	$(PIP) torch==2.13.0
	# --no-build-isolation: DeepSpeed's source build imports the torch installed above.
	DS_BUILD_OPS=0 $(PIP) --no-build-isolation -e ".[triton,train,trl,dev]"
	touch $@

# The linter (ruff.toml: pyflakes + import order), then the whole test suite, on CPU (Triton through its
# interpreter).
test: venv
	$(BIN)/ruff check .
	$(BIN)/pytest tests

# The main job: train the tiny preset on the embedded dataset (SCFT + DeRTa), on CPU.
train: venv
	$(BIN)/scft-fast train

# The op benchmark table on this machine (CPU: torch and C++ backends against the anchors).
bench: venv
	$(BIN)/python benchmarks/bench_op.py

# On a CUDA machine, with no package index needed: versions, a warm-up, the op benchmark at the GPU shapes, a
# training step, the op's options, device ceilings and the CUDA tests, every result and log under OUT
# (benchmarks/README.md, "The GPU run").
gpu-check:
	@test -n "$(OUT)" || { echo "usage: make gpu-check OUT=DIR (every result and log goes under DIR)" >&2; exit 2; }
	bash benchmarks/gpu_run.sh "$(OUT)"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
