# Two commands matter: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMTOOL := $(BIN)/promtool

.PHONY: serve test test-all lint bench bench-peers bench-faults bench-fairshare clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first, so the embedding example's dependencies never pull CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,examples]'
	touch $(STAMP)

# promtool checks infra/prometheus/ in the tests. It comes from Debian's prometheus package,
# unpacked without root or installing anything: apt-get download into a temporary directory
# (with a private copy of the package lists when this machine has none), promtool copied out.
$(PROMTOOL): | $(STAMP)
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; cd "$$tmp"; \
	if ! apt-get -q download prometheus; then \
		echo "no usable apt lists here: fetching the package index into $$tmp"; \
		mkdir -p lists/partial cache/archives/partial; \
		apt="apt-get -q -o Dir::State::Lists=$$tmp/lists -o Dir::Cache=$$tmp/cache"; \
		$$apt update; $$apt download prometheus; \
	fi; \
	dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool; \
	usr/bin/promtool --version; \
	install -m 755 usr/bin/promtool $(CURDIR)/$(PROMTOOL)

serve: $(STAMP)
	$(BIN)/runq serve examples/embed.py

lint: $(STAMP)
	$(BIN)/ruff check runq tests benchmarks examples
	$(BIN)/ruff format --check runq tests benchmarks examples
	$(BIN)/mypy

# Three xdist workers on two cores (the suite mostly waits on its processes), each with its own
# Valkey, gateway and workers; whole modules to each, so a module's own processes start once,
# in the order tests/conftest.py sets.
test: lint $(PROMTOOL)
	$(BIN)/pytest -q -n 3 --dist loadfile --no-loadscope-reorder

# Everything, the soak and load runs marked slow included (`make test` leaves them out).
test-all: lint $(PROMTOOL)
	$(BIN)/pytest -q -m ""

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# runq's echo against other serving stacks' (BentoML 1.4), each peer in its own venv under build/
# so its dependencies never meet runq's. Not part of `make test` or `make bench`.
PEERS_VENV := build/peers-venv
PEERS_STAMP := $(PEERS_VENV)/.installed

$(PEERS_STAMP):
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/pip install --quiet 'bentoml>=1.4,<1.5'
	touch $(PEERS_STAMP)

bench-peers: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python benchmarks/peers.py --bentoml-python $(PEERS_VENV)/bin/python

# 60 s of load while Valkey (AOF) is stopped twice: what became of every task, and of runq.
bench-faults: $(STAMP)
	$(BIN)/python benchmarks/faults.py --duration 60

# Tenant A floods 5,000 tasks while tenant B predicts 2/s: B's p99 and A's throughput against
# each alone. Not part of `make test` or `make bench`.
bench-fairshare: $(STAMP)
	$(BIN)/python benchmarks/fairshare.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
