# The course's two commands (see README.md):
#   make lab    set everything up, then open JupyterLab on notebooks/
#   make test   set everything up, then run every test (unit tests + nbval over every notebook)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup lab test data checkpoints clean-venv

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

# Retrain every shipped checkpoint with the command its manifest entry records, then the tables
# measured from them (about 4 hours on a 2-core CPU). The classifier comes first: the other
# models' FIDs use its features. Each command also runs alone; tests/test_checkpoint.py checks
# that this list and the manifest agree.
checkpoints: setup
	$(PY) -m course_lib.classifier --epochs 8.0 --seed 0
	$(PY) -m course_lib.autoencoder --latent-dim 2 --epochs 3
	$(PY) -m course_lib.autoencoder --latent-dim 16 --epochs 3.0 --out data/checkpoints/autoencoder_16.pt
	$(PY) -m course_lib.vae fashion --seed 0
	$(PY) -m course_lib.vae faces --seed 0
	$(PY) -m course_lib.gan --seed 0
	$(PY) -m course_lib.diffusion train --steps 6000 --threads 2
	$(PY) -m course_lib.diffusion fid --samples 1000 --large-samples 10000 --large-row ddim_50 --threads 2
	$(PY) -m course_lib.leaderboard
	$(PY) -m course_lib.imagen train fashion base --encoder minilm --steps 4000
	$(PY) -m course_lib.imagen train fashion base --encoder scratch --steps 4000
	$(PY) -m course_lib.imagen train fashion sr --encoder minilm --steps 1000
	$(PY) -m course_lib.imagen train shapes base --encoder minilm --steps 4000
	$(PY) -m course_lib.imagen train shapes base --encoder scratch --steps 4000
	$(PY) -m course_lib.imagen train shapes sr --encoder minilm --steps 1000
	$(PY) -m course_lib.imagen evaluate --per-class 50 --shapes-n 100
	$(PY) -m course_lib.normalization --images 12000 --epochs 4 --seed 0

clean-venv:
	rm -rf $(VENV)
