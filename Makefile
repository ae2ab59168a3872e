# One-command set-up: `make demo` runs the whole pipeline on the built-in demo world,
# `make test` runs the test suite. Both create .venv first if it is missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint clean gpu-wheels gpu-smoke

$(BIN)/geoloc: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision pinned to the builds this project is tested with (installed from local disk where present).
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[all,dev]'
	# bytecode for the editable package, as a wheel install has (PYTHONDONTWRITEBYTECODE=1 shells never write it)
	$(BIN)/python -m compileall -q geoloc_cli
	touch $(BIN)/geoloc

install: $(BIN)/geoloc

GEOLOC := $(BIN)/geoloc
DEMO := -c demo
# The cached-embedding recipe (configs/recipes/clip-frozen.yaml) at demo size: no weights can be downloaded
# here, so the frozen backbone is the dual-branch run's trained RGB ViT (model.pretrained takes a geoloc
# checkpoint); embed once, then train MLP heads on the fp16 embeddings.
DEMO_EMB := $(DEMO) --set train.run=demo-embeddings --set model.seg_channels=0 --set train.source=embeddings \
	--set train.trainable_blocks=0 --set model.head_hidden=128 --set model.pretrained=geoloc-data/demo/runs/demo/model.safetensors

demo: install
	$(GEOLOC) fetch demo $(DEMO)
	$(GEOLOC) partition --cells all $(DEMO)
	$(GEOLOC) filter $(DEMO)
	$(GEOLOC) segment $(DEMO)
	$(GEOLOC) train $(DEMO)
	$(GEOLOC) embed $(DEMO_EMB)
	$(GEOLOC) train $(DEMO_EMB)
	# both runs side by side: the dual-branch ViT and the heads trained on its cached RGB embeddings
	$(GEOLOC) evaluate $(DEMO) --model geoloc-data/demo/runs/demo/model.safetensors \
		--model geoloc-data/demo/runs/demo-embeddings/model.safetensors
	# retrieval refinement: a gallery of the training photos' cached RGB embeddings (the demo run's RGB ViT
	# embedded them above), then the cell centre and the refined position side by side
	$(GEOLOC) index $(DEMO)
	$(GEOLOC) evaluate $(DEMO) --refine knn
	# a held-out photo (the first of the demo_val URL list)
	$(GEOLOC) predict $$(head -1 geoloc-data/demo/meta/demo_val_urls.csv | cut -d, -f2 | sed 's|^file://||') $(DEMO)

test: install
	$(BIN)/ruff check geoloc_cli tests benchmarks
	$(BIN)/pytest

# The edit loop: everything but the tests marked slow (end-to-end runs, process launches); CI runs `make test`.
test-fast: install
	$(BIN)/pytest -m "not slow"

# What a lent GPU machine (Python 3.12, x86-64, no network) lacks, as wheels for the device tool to carry
# (`carry: [".whl"]`); benchmarks/gpu_check.sh installs them with --no-deps beside the machine's torch.
gpu-wheels:
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform any -d .whl simplejpeg==1.9.0 s2sphere==0.2.5 future==1.0.0

# The GPU check's steps on this CPU with tiny sizes (~2 min), so the script cannot rot between GPU loans.
gpu-smoke: install
	PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh geoloc-data/gpu-smoke --smoke

lint: install
	$(BIN)/ruff check geoloc_cli tests benchmarks

# Only what `make demo` and `make gpu-smoke` made: geoloc-data itself is the default root for real data.
clean:
	rm -rf geoloc-data/demo geoloc-data/gpu-smoke .pytest_cache
	rmdir geoloc-data 2>/dev/null || true
