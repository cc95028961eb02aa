# dtrain: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: venv demo test acceptance bench proto clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/dtrain-train

test: venv
	$(PY) -m pytest

# the issue's acceptance runs with the shipped defaults (about 4 minutes on 2 cores)
acceptance: venv
	$(PY) -m pytest -m acceptance -s

bench: venv
	$(PIP) install -q -e ".[dev,bench]"
	$(PY) bench/supernet_step.py

# Generated gRPC code is checked in (dtrain/v1/); regenerate after editing proto/.
# tests/test_proto_drift.py fails when the checked-in code does not match the .proto files.
proto: venv
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. proto/dtrain/v1/dtrain.proto

clean:
	rm -rf $(VENV) runs outputs
