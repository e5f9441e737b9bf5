PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A local wheel folder (if any) is searched first, so an offline CPU build of torch is used when present.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: venv install test test-fast demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(FIND_LINKS) -e '.[test]'
	touch $@

venv install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

demo: $(VENV)/.installed
	$(VENV)/bin/ciss demo

clean:
	rm -rf $(VENV) .pytest_cache runs .cache
