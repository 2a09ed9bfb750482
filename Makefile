# Two commands on a fresh clone: `make demo` (train and compare no-CoT, explicit CoT and implicit CoT)
# and `make test`. Both create .venv and install the project first.
PYTHON ?= python3
VENV   ?= .venv
# The CPU wheel of this version is what the project is tested with; on a GPU machine pass e.g.
# TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" or an installed torch.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.icot-installed

.PHONY: install test demo smoke clean

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

clean:
	rm -rf runs/demo runs/smoke
