# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
# Each creates or refreshes .venv idempotently (re-installs only when pyproject.toml changed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint venv clean bench

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/vilbert-data demo --out demo_out $(if $(WEIGHTS),--weights $(WEIGHTS),)

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
