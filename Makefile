# Every target sets itself up: a fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-slow test-heavy test-all data lint bench reproduce clean

$(STAMP): setup.py requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Fashion-MNIST as IDX files: Debian's package when we are root on Debian, else say how.
data:
	@if [ -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST found in $(FASHION_MNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST IDX files are not in $(FASHION_MNIST_DIR)."; \
	  echo "Install them (Debian: sudo apt-get install dataset-fashion-mnist), pass --data_dir=DIR"; \
	  echo "to the binaries, or let TFDS download them (needs the internet)."; \
	fi

demo: $(STAMP) data
	$(PY) experiments/demo.py --output_dir=artifacts/demo

# `make test`: the fast suite (a few minutes); `make test-slow`: the tests marked slow (over
# about 20 s each); CI (.ci/run) runs both, so nothing loses coverage.
test: $(STAMP) data
	$(PY) -m pytest -q -m "not slow" tests

test-slow: $(STAMP) data
	$(PY) -m pytest -q -m "slow and not heavy" tests

# DenseNet121-size checks, tens of minutes on two cores: run by hand, not in CI.
test-heavy: $(STAMP) data
	$(PY) -m pytest -q -m heavy tests

test-all: $(STAMP) data
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check mtz_tf experiments benchmarks tests
	$(PY) -m ruff format --check mtz_tf experiments benchmarks tests

bench: $(STAMP)
	$(PY) benchmarks/bench_speed.py --resnet50
	$(PY) benchmarks/bench_cost.py
	$(PY) benchmarks/bench_matching.py

reproduce: $(STAMP) data
	$(PY) experiments/reproduce.py --experiment=lenet300

clean:
	rm -rf $(VENV) artifacts .pytest_cache
