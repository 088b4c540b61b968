# `make test` and `make demo` create .venv on first use; everything else assumes it exists.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo install clean benchmark

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# Pinned: these two are the builds this project is tested with.
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) tools/demo.py

benchmark: $(STAMP)
	$(PY) tools/benchmark.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
