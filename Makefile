# ssr — run `make help` for the list of targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1
# The tested torch pair; both lie on this machine's local wheel store (see README, "Install").
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.DEFAULT_GOAL := help

help: ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

install: $(PY) ## create .venv and install ssr (editable) with the dev and onnx extras
	$(PY) -m pip install $(TORCH_PIN)
	$(PY) -m pip install -e ".[dev,onnx]" $(TORCH_PIN)

test: ## fast test suite (about 3 min on 2 cores)
	$(PY) -m pytest -m "not slow" -q

test-all: ## every test, slow ones included
	$(PY) -m pytest -q

lint: ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: ## ruff fix + format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: ## synthetic data -> source-only, DAFormer, MIC, SSR, MIC+SSR on the CPU -> table + chart
	$(PY) scripts/demo.py

train: ## train (pass ARGS="experiment=mic_ssr ...")
	$(PY) -m ssr.train $(ARGS)

eval: ## evaluate a checkpoint (pass ARGS="ckpt_path=... ")
	$(PY) -m ssr.eval $(ARGS)

clean: ## remove caches and run outputs (keeps .venv and data/)
	rm -rf .pytest_cache .ruff_cache outputs logs multirun wandb
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

.PHONY: help install test test-all lint format demo train eval clean
