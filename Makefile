# The two commands a newcomer needs: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=

.PHONY: serve test lint venv fetch-model bench bench-quick bench-engine gpu-check docker docker-cpu docker-cpu-local docker-gpu-local clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

fetch-model: venv
	$(PY) -m model.defaults

serve: venv fetch-model
	$(PY) -m server --host $(HOST) --port $(PORT) $(SERVE_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check model server bench tests
	$(VENV)/bin/mypy model server

test: venv fetch-model lint
	$(VENV)/bin/pytest -q

# The short-prompt decode load at 1-64 streams, then the long-prompt loads: 1,500-token prompts (with the
# single-prompt prefill probe), chat on one shared system prompt, and long prompts arriving among streams.
bench: venv fetch-model
	$(PY) -m bench.serve_bench --out bench/results
	$(PY) -m bench.serve_bench --workload long --concurrency 1,8,32 --out bench/results
	$(PY) -m bench.serve_bench --workload shared-prefix --concurrency 32 --out bench/results
	$(PY) -m bench.serve_bench --workload mixed --concurrency 32 --out bench/results

bench-quick: venv fetch-model
	$(PY) -m bench.serve_bench --quick --out bench/results

bench-engine: venv fetch-model
	$(PY) -m bench.engine_bench --out bench/results

gpu-check:
	bash bench/gpu_check.sh

docker:
	docker build -t smollm2-server .

docker-cpu:
	docker build -t smollm2-server:cpu --build-arg BASE_IMAGE=debian:bookworm-slim --build-arg CPU_KERNELS=true \
		--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .

docker-cpu-local:
	bash docker/build-cpu-local.sh

docker-gpu-local:
	bash docker/build-gpu-local.sh

clean:
	rm -rf $(VENV) .pytest_cache
