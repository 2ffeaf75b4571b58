# Two entry points, both self-installing into ./.venv:
#   make demo   the main job on the embedded default data in data/
#   make test   the whole test suite
# Install torch first so the "train" extra's "torch>=2.1" is already met: on this machine kind,
# torch==2.13.0 is a local CPU build (a bare `torch` would pull a multi-GB CUDA build).
# torchvision is pinned to the release made for that torch, in the same pip call: an unpinned
# torchvision would pull a newer (CUDA) torch. Elsewhere: make test TORCH=torch TORCHVISION=torchvision
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCHVISION ?= torchvision==0.28.0
DATA ?= data/fashion-mnist
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install data data-threat data-models clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" "$(TORCHVISION)"
	$(BIN)/python -m pip install --quiet -e ".[train,dev,plot,vision,serve,ray]"
	touch $@

# The demo's own output directory: rerunning `make demo` replaces its previous report (--force).
demo: $(STAMP)
	$(BIN)/logitguard demo --data $(DATA) --out demo-report --force

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Rebuild the embedded default (data/README.md records its provenance). Slow: about an hour on 2 cores.
MODEL := data/fashion-mnist-cnn
# Caps apply per split, so each split has its own export: the attacked test rows cover the first 1,000 of the
# 2,000 clean test samples (the samples every threat-model partition uses), to keep data/ under 40 MB.
TRAIN_ARGS ?= --splits train --train-samples 10000 --max-samples deepfool=2000,cw=2000,fgsm=4000,bim=4000,mim=4000
TEST_ARGS ?= --splits test --test-samples 2000 --max-samples fgsm=1000,bim=1000,pgd=1000,mim=1000,deepfool=1000,cw=1000
data: $(STAMP)
	test -f $(MODEL).pt || $(BIN)/logitguard-produce train --dataset fashion-mnist --epochs 6 --out $(MODEL)
	$(BIN)/logitguard-produce export --dataset fashion-mnist --model $(MODEL) $(TRAIN_ARGS) --noise-queries 8 --out $(DATA)
	$(BIN)/logitguard-produce export --dataset fashion-mnist --model $(MODEL) $(TEST_ARGS) --noise-queries 8 --out $(DATA)

# The threat-model partitions (transfer, oblivious at 8/255, surrogate, adaptive) against data/defenses.
# Minutes on a GPU (THREAT_DEVICE=cuda), hours on 2 CPU cores.
THREAT_DEVICE ?= cpu
data-threat: $(STAMP)
	test -f data/defenses/defenses.json || $(BIN)/logitguard fit-pipelines $(DATA) --out data/defenses
	PRODUCE=$(BIN)/logitguard-produce TABLE=$(DATA) data/threat.sh $(THREAT_DEVICE)

# The model-side comparison (docs/model-side.md): four more models, every threat model, GRED; writes
# data/models/ (models and tables go to models-work/). About 75 minutes on 2 CPU cores (THREAT_DEVICE=cuda: GPU).
data-models: $(STAMP)
	BIN=$(BIN) data/models.sh $(THREAT_DEVICE)

clean:
	rm -rf $(VENV) .pytest_cache
