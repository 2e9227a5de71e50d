# Every target creates .venv itself, so each works on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PORT ?= 5000

.PHONY: setup data run test test-slow test-all ui server bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST from Debian's package (no download at run time); skipped where apt is missing.
data:
	@if [ -e $(FMNIST) ]; then :; \
	elif command -v apt-get >/dev/null; then \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; \
	else echo "no apt-get: run with data.download=true or point data.root at Fashion-MNIST"; fi

setup: $(STAMP) data

run: setup
	$(PY) -m densenet_exp.run experiment=quickstart

test: setup
	$(PY) -m pytest -m "not slow"

test-slow: setup
	$(PY) -m pytest -m slow

test-all: setup
	$(PY) -m pytest

ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(PORT)

# A team tracking server on 127.0.0.1: PostgreSQL backend where Debian's postgresql is installed.
server: setup
	PORT=$(PORT) tools/tracking-server

# BENCH_ARGS, e.g. "--size 224 --batch 32" or, on a shared machine, "--threads 1 --clock cpu".
bench: setup
	$(PY) -m densenet_exp.bench $(BENCH_ARGS)

clean:
	rm -rf outputs reports
