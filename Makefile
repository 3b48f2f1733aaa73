# tfweave: `make demo` and `make test` set up everything on a fresh machine (venv, pip install,
# system packages, both op builds) and then run. Other targets are the steps they are made of.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
INSTALLED := $(VENV)/.tfweave-installed
# The TensorFlow pin is also in pyproject.toml; it is installed first because the op build
# compiles against it (pip runs with --no-build-isolation so the wheel is fetched once).
TF_PIN := tensorflow==2.21.0
PYTEST_ARGS ?=

.PHONY: demo test venv install ops system-deps bazel bazel-test gpu-check bench clean

demo: install ops
	$(VENV)/bin/tfweave demo

test: install ops bazel
	bash tools/run_pytest.sh $(PY) $(PYTEST_ARGS)

venv: $(PY)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): $(PY) pyproject.toml setup.py
	$(PIP) install -q --upgrade pip "setuptools>=68" wheel
	$(PIP) install -q "$(TF_PIN)"
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	touch $@

install: $(INSTALLED)

# Incremental: libraries whose sources and TensorFlow are unchanged are not rebuilt.
ops: $(INSTALLED)
	$(PY) -m tfweave.ops.build --quiet

system-deps:
	bash tools/install_system_deps.sh

bazel: system-deps $(INSTALLED)
	bash tools/bazel_build.sh $(PY)

bench: install ops
	$(PY) -m benchmarks all

clean:
	rm -rf $(VENV) python/tfweave/ops/lib build *.egg-info python/*.egg-info
	-bazel clean --expunge 2>/dev/null
