# Set-up is two commands on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install serve test lint bench clean

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/s3d serve

test: $(STAMP)
	$(VENV)/bin/ruff check serve_app workers router tests
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check serve_app workers router tests

bench: $(STAMP)
	$(VENV)/bin/s3d bench --out bench-out

clean:
	rm -rf $(VENV) bench-out .pytest_cache
