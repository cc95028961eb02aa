# dtrain: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: venv demo train-demo lint test acceptance compose-test soak bench proto docs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# 3 peers over an emulated WAN, one SIGKILLed, one joining (about 2 minutes on 2 cores)
demo: venv
	$(VENV)/bin/dtrain-sim

# one peer alone, the supernet core's demo
train-demo: venv
	$(VENV)/bin/dtrain-train

# ruff (lint + format check) over dtrain/, tests/, bench/; pyright (basic) over the packages pyproject names
lint: venv
	$(VENV)/bin/ruff check dtrain tests bench docker
	$(VENV)/bin/ruff format --check dtrain tests bench docker
	$(VENV)/bin/pyright

test: lint
	$(PY) -m pytest

# longer runs kept out of `make test`: the shipped defaults (train, GPT preset, `make demo`), a
# user-driven restart of a finished simulation and four heavier smoke runs (about 10 minutes on 2 cores),
# then `make compose-test` (skipped with one line when no Docker engine answers)
acceptance: venv
	$(PY) -m pytest -m acceptance -s
	$(MAKE) compose-test

# the docker-compose simulation through a real Docker engine: a base image (from Debian packages when
# no registry is reachable), the image, certificates + coordinator + 4 peers + chaos, parity on every
# round, down -v (also on failure). One line and exit 0 when no engine answers. Kept out of `make test`.
compose-test: venv
	PYTHONPATH=$(CURDIR) TORCH="$(TORCH)" $(PY) docker/compose_test.py

# 4 peers for 10 minutes: a kill every 2-6 s (restarted), joins, two coordinator restarts
soak: venv
	$(VENV)/bin/dtrain-sim sim.peers=4 sim.rounds=100000 sim.duration_s=600 sim.timeout_s=720 \
	  'chaos.kill_every_s=[2,6]' chaos.restart_after_s=3 'chaos.join_at_s=[60,240]' \
	  'chaos.coordinator_restart_at_s=[150,400]' 'chaos.kill_at_s=[]' chaos.min_alive=2 \
	  'sim.coordinator_args=["lease_timeout_s=3","heartbeat_interval_s=0.5"]'

bench: venv
	$(PIP) install -q -e ".[dev,bench]"
	$(PY) bench/supernet_step.py

# Generated gRPC code is checked in (dtrain/v1/); regenerate after editing proto/.
# tests/test_proto_drift.py fails when the checked-in code does not match the .proto files.
proto: venv
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. proto/dtrain/v1/dtrain.proto

# The README's configuration reference is generated from dtrain/config.py and conf/;
# tests/test_config_reference.py fails when it is stale.
docs: venv
	$(PY) -m dtrain.cli.config_reference --write

clean:
	rm -rf $(VENV) runs outputs
