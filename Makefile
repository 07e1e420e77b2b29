# The course's two commands (see README.md):
#   make lab    set everything up, then open JupyterLab on notebooks/
#   make test   set everything up, then run every test (unit tests + nbval over every notebook)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup lab test data clean-venv

setup: $(VENV)/.installed data

# d2l==1.0.3 pins numpy 1.23.5 and friends (no wheels for Python 3.12+); its real imports are
# dependencies of course_lib, so it is installed without its pins.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps d2l==1.0.3
	touch $@

data: $(VENV)/.installed
	$(PY) -m course_lib.data

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

test: setup
	TQDM_DISABLE=1 COURSE_QUICK=1 MPLBACKEND=Agg $(PY) -m pytest

clean-venv:
	rm -rf $(VENV)
