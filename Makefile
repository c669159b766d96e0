# `make run`: set up .venv from nothing and train the default model (report in workdir/).
# `make compare`: Dense / MoE / PKM / UltraMem + ablation ladder, reduced (≈15-20 min on a
# 2-core CPU); report in workdir/compare/report.md.
# `make test`: set up .venv with the test extras and run the whole suite.
# `make device-check`: on a TPU / NVIDIA GPU, every Pallas kernel compiled vs its XLA
# reference, timed against the chip's roofline (experiments/device_check.py; sized for
# < 8 min; flags via ARGS, e.g. `make device-check ARGS=--quick`).
# `make aot-deps`: libtpu into .venv/libtpu, to compile for TPU pods on this machine
# (experiments/aot_compile.py, docs/scaling.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/default

.PHONY: run test test-fast compare device-check aot-deps clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# libtpu (TPU compiles on this host, tests/tpu_aot.py) goes off sys.path into
# .venv/libtpu, so plain `import jax` (make run) never loads it; if it cannot be
# downloaded, the TPU-compile tests skip.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test]"
	-$(PY) -m pip install --quiet --no-deps --target $(VENV)/libtpu "$$($(PY) tests/tpu_aot.py)"
	touch $@

run: $(VENV)/.installed
	$(PY) experiments/train.py --config=experiments/configs/default.py --workdir=$(WORKDIR)

compare: $(VENV)/.installed
	$(PY) experiments/compare.py --reduced --workdir=workdir/compare

test: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 --dist worksteal -q

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 --dist worksteal -q -m "not slow"

device-check: $(VENV)/.installed
	$(PY) experiments/device_check.py $(ARGS)

aot-deps: $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/libtpu \
	  "$$($(PY) -c 'from sparsejax.scaling.tpu import libtpu_requirement as r; print(r())')"

clean:
	rm -rf $(VENV) workdir .jax_cache
