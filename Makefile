# Every target creates .venv itself, so each works on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PORT ?= 5000
NBPORT ?= 8888
# Optional: the MLflow experiment (and sweep) that `make ui` / `make notebook` open, e.g. EXPERIMENT=smoke.
EXPERIMENT ?=
SWEEP ?=
PLAN ?=

.PHONY: setup data run test test-slow test-all slurm-local slurm-local-stop ui ui-screenshot notebook startup-time server bench bench-study study decisive-pilot decisive pair study-report study-notebooks study-screenshot clean

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

# The default suite on every core (pytest-xdist), one test file per worker at a time (--dist loadfile:
# a file's module-scoped fixtures are made once); the workers share the tiny sweep and give torch
# each its share of the cores (tests/conftest.py). TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= auto
test: setup
	$(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadfile

# One test at a time: these time waits, kill processes and restart servers, which a second worker
# on the same cores would make flaky.
test-slow: setup
	$(PY) -m pytest -m slow -p no:xdist

test-all: setup
	$(PY) -m pytest

# A one-node Slurm cluster on this machine for `hydra/launcher=slurm_local` (tools/slurm-local:
# installs slurm-wlm and munge if missing; needs root); `make slurm-local-stop` stops it.
slurm-local:
	$(SUDO) tools/slurm-local start

slurm-local-stop:
	$(SUDO) tools/slurm-local stop

# MLflow UI on 127.0.0.1; prints the URL of an experiment's runs table (default: the latest training run's).
ui: setup
	$(PY) tools/mlflow-ui --port $(PORT) $(if $(EXPERIMENT),--experiment $(EXPERIMENT))

# Headless-Chromium screenshot of that runs table (needs chromium: apt-get install -y chromium).
ui-screenshot: setup
	$(PY) tools/ui-screenshot --out $(or $(OUT),ui-runs.png) $(if $(EXPERIMENT),--experiment $(EXPERIMENT))

# Jupyter (installed into the venv on first use) on 127.0.0.1 over notebooks/, with the store set;
# EXPERIMENT, SWEEP and PLAN (a declared study plan), if given, choose what the notebooks read.
notebook: setup
	@$(VENV)/bin/jupyter-lab --version >/dev/null 2>&1 || $(PY) -m pip install -q 'jupyterlab>=4'
	MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" \
	$(if $(EXPERIMENT),DENSENET_EXP_EXPERIMENT=$(EXPERIMENT)) $(if $(SWEEP),DENSENET_EXP_SWEEP=$(SWEEP)) \
	$(if $(PLAN),DENSENET_EXP_PLAN=$(abspath $(PLAN))) \
	$(VENV)/bin/jupyter-lab --ip 127.0.0.1 --port $(NBPORT) --no-browser --notebook-dir notebooks \
		$(if $(filter 0,$(shell id -u)),--allow-root)

# How long `--help` of the training and report commands takes, and a bad override to be rejected (a benchmark).
startup-time: setup
	$(PY) tools/startup-time

# A team tracking server on 127.0.0.1: PostgreSQL backend where Debian's postgresql is installed.
server: setup
	PORT=$(PORT) tools/tracking-server

# BENCH_ARGS, e.g. "--size 224 --batch 32" or, on a shared machine, "--threads 1 --clock cpu".
bench: setup
	$(PY) -m densenet_exp.bench $(BENCH_ARGS)

# The study's arms at 28x28: each setting's train img/s and the defaults' ratio to the previous ones
# (docs/performance.md); BENCH_ARGS e.g. "--clock cpu" on a shared machine, "--arms resnet20 --steps 3".
bench-study: setup
	$(PY) benchmarks/study_speed.py $(BENCH_ARGS)

# The Fashion-MNIST study (conf/experiment/study_fmnist.yaml): the DenseNet knob grid, then the
# baselines, 3 seeds each, into the default store; `study-report` rebuilds its committed report.
STUDY := docs/results/study_fmnist
# One seed at a time over every arm, so a study cut short still has every arm; one one-thread job
# per core at a time (hydra/launcher=cpu_parallel: docs/performance.md).
study: setup
	for seed in 0 1 2; do \
	  $(PY) -m densenet_exp.run -m experiment=study_fmnist model=resnet20,resnet56,plain20 seed=$$seed hydra/launcher=cpu_parallel && \
	  $(PY) -m densenet_exp.run -m experiment=study_fmnist growth_rate=12,24 compression=0.5,1.0 bottleneck=true,false seed=$$seed hydra/launcher=cpu_parallel \
	  || exit 1; done
	$(PY) -m densenet_exp.export save --experiment study_fmnist --out $(STUDY)/runs.jsonl.gz

# The decisive study (docs/results/fmnist_decisive): its plan declares the pilot (exploration) and the
# confirmation; `decisive-pilot`, then `decisive` (prints the estimate from the pilot, then trains, then
# exports). Each resumes where it stopped.
DECISIVE := docs/results/fmnist_decisive
decisive-pilot: setup
	$(PY) -m densenet_exp.study run $(DECISIVE)/plan.yaml --stage exploration

decisive: setup
	$(PY) -m densenet_exp.study estimate $(DECISIVE)/plan.yaml
	$(PY) -m densenet_exp.study run $(DECISIVE)/plan.yaml --stage confirmation
	$(PY) -m densenet_exp.export save --experiment fmnist_decisive --out $(DECISIVE)/runs.jsonl.gz

# The decisive study's parameter pair again, on a new plan sized at Holm's level for its own family
# (docs/results/fmnist_pair): the sizing (from the decisive study's seed SD), then 10 fresh seeds per side.
PAIR := docs/results/fmnist_pair
pair: setup
	$(PY) -m densenet_exp.study estimate $(PAIR)/plan.yaml --sd 0.37
	$(PY) -m densenet_exp.study run $(PAIR)/plan.yaml --stage confirmation
	$(PY) -m densenet_exp.export save --experiment fmnist_pair --out $(PAIR)/runs.jsonl.gz

# Regenerates each committed study's report.md (and headline.md, the READMEs' quoted headlines) from its committed
# runs, without training: they are loaded into a throwaway store at a fixed path (the report names it);
# a study with a plan.yaml is judged by its plan.
STUDIES := study_fmnist fmnist_decisive fmnist_pair
study-report: setup
	@for s in $(STUDIES); do \
	  [ -f docs/results/$$s/runs.jsonl.gz ] || continue; \
	  rm -rf .study-store && mkdir .study-store && \
	  $(PY) -m densenet_exp.export load docs/results/$$s/runs.jsonl.gz --tracking-uri sqlite:///.study-store/mlflow.db && \
	  $(PY) -m densenet_exp.report --experiment $$s --tracking-uri sqlite:///.study-store/mlflow.db --out docs/results/$$s \
	    $$([ -f docs/results/$$s/plan.yaml ] && echo --plan docs/results/$$s/plan.yaml) || { rm -rf .study-store; exit 1; }; \
	done; rm -rf .study-store
	$(PY) tools/readme-headlines

# Executes both notebooks on a committed study (default: the decisive one, judged by its plan.yaml)
# and saves them with their outputs; the experiment is the study folder's name, and a study with a
# plan.yaml is judged by it. The first study: `make study-notebooks STUDY=docs/results/study_fmnist`.
study-notebooks: STUDY = $(DECISIVE)
study-notebooks: setup
	@rm -rf .study-store && mkdir .study-store && \
	$(PY) -m densenet_exp.export load $(STUDY)/runs.jsonl.gz --tracking-uri sqlite:///$(CURDIR)/.study-store/mlflow.db && \
	$(PY) tools/run-notebooks --tracking-uri sqlite:///$(CURDIR)/.study-store/mlflow.db --experiment $(notdir $(STUDY)) \
	  $(if $(wildcard $(STUDY)/plan.yaml),--plan $(STUDY)/plan.yaml); \
	s=$$?; rm -rf .study-store; exit $$s

# The MLflow UI's runs table over the committed study: sweeps with their nested runs.
study-screenshot: setup
	@rm -rf .study-store && mkdir .study-store && \
	$(PY) -m densenet_exp.export load $(STUDY)/runs.jsonl.gz --tracking-uri sqlite:///$(CURDIR)/.study-store/mlflow.db && \
	$(PY) tools/ui-screenshot --store sqlite:///$(CURDIR)/.study-store/mlflow.db --experiment study_fmnist --out $(STUDY)/mlflow-ui.png; \
	s=$$?; rm -rf .study-store; exit $$s

clean:
	rm -rf outputs reports
