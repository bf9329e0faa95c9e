# sparq — every target creates and uses its own virtual environment in $(VENV).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned first, on its own: this version resolves to the local CPU build here, and with it
# installed, the package's "torch>=2.2" requirement pulls nothing more (never a multi-GB CUDA build).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.sparq-installed

.PHONY: install test test-slow lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "$(TORCH)"
	$(PIP) install -q --disable-pip-version-check -e ".[test,dev,plot]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check sparqcli tests benchmarks
	$(VENV)/bin/ruff format --check sparqcli tests benchmarks

demo: install
	$(PY) examples/make_example.py build/example.pt
	$(VENV)/bin/sparq compress build/example.pt --config configs/default.yaml -o build/example.sparq.safetensors --force
	$(PY) examples/serve_example.py build/example.pt build/example.sparq.safetensors
	$(VENV)/bin/sparq plan build/example.pt --config configs/default.yaml --budget 0.1 -o build/example.plan.yaml --plot build/example.plan.svg --force

bench: install
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_e2e.py
	$(PY) benchmarks/bench_scaling.py
	$(PY) benchmarks/bench_concurrency.py
	$(PY) benchmarks/bench_cuda.py
	$(PY) benchmarks/bench_serving.py --wait-quiet 60
	$(PY) benchmarks/bench_quality.py
	$(PY) benchmarks/bench_plan.py
	$(PY) benchmarks/bench_distributed.py

clean:
	rm -rf build .pytest_cache
