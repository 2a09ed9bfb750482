# Two commands on a fresh clone: `make demo` (train and compare no-CoT, explicit CoT and implicit CoT)
# and `make test`. Both create .venv and install the project first.
PYTHON ?= python3
VENV   ?= .venv
# The CPU wheel of this version is what the project is tested with; on a GPU machine pass e.g.
# TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" or an installed torch.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.icot-installed

.PHONY: install test demo smoke gpu-wheels clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/pytest -m ""

demo: install
	$(BIN)/icot pipeline configs/demo.yaml --out runs/demo

smoke: install
	$(BIN)/icot pipeline configs/smoke.yaml --out runs/smoke

# The pure-Python packages a GPU device image lacks or has too old (benchmarks/gpu_paper.sh), as wheels for
# its Python 3.12, at the versions this environment runs.
GPU_WHEELS := jsonargparse transformers huggingface_hub kernels tomlkit httpx2 httpcore2 truststore regex
gpu-wheels: install
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	    $$($(BIN)/pip list --format=freeze | grep -i -E "^($$(echo $(GPU_WHEELS) | tr ' ' '|'))==" )

clean:
	rm -rf runs/demo runs/smoke
