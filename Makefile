# Every target creates .venv itself, so each works on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PORT ?= 5000

.PHONY: setup data run test test-slow test-all ui server bench study study-report clean

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

bench: setup
	$(PY) -m densenet_exp.bench

# The Fashion-MNIST study (conf/experiment/study_fmnist.yaml): the DenseNet knob grid, then the
# baselines, 3 seeds each, into the default store; `study-report` rebuilds its committed report.
STUDY := docs/results/study_fmnist
# One seed at a time over every arm, so a study cut short still has every arm.
study: setup
	for seed in 0 1 2; do \
	  $(PY) -m densenet_exp.run -m experiment=study_fmnist model=resnet20,resnet56,plain20 seed=$$seed && \
	  $(PY) -m densenet_exp.run -m experiment=study_fmnist growth_rate=12,24 compression=0.5,1.0 bottleneck=true,false seed=$$seed \
	  || exit 1; done
	$(PY) -m densenet_exp.export save --experiment study_fmnist --out $(STUDY)/runs.jsonl.gz

# Regenerates $(STUDY)/report.md from the committed runs, without training: they are loaded into a
# throwaway store first.
study-report: setup
	@d=$$(mktemp -d) && \
	$(PY) -m densenet_exp.export load $(STUDY)/runs.jsonl.gz --tracking-uri sqlite:///$$d/mlflow.db && \
	$(PY) -m densenet_exp.report --experiment study_fmnist --tracking-uri sqlite:///$$d/mlflow.db --out $(STUDY); \
	s=$$?; rm -rf $$d; exit $$s

clean:
	rm -rf outputs reports
