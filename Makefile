# The course's two commands (see README.md):
#   make lab    set everything up, then open JupyterLab on notebooks/ (PROJECTOR=1: large fonts)
#   make test   set everything up, then run every test (unit tests + nbval over every notebook)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup lab test lock data checkpoints time-to-quality time-to-quality-candidates clean-venv

# JupyterLab's settings for the course: lab/settings/overrides.json (no news pop-up). With
# PROJECTOR=1 the user settings in lab/projector/ (larger fonts) too, copied at each start to
# runs/lab-projector/, where JupyterLab keeps what is changed during the session. As root (a
# container) JupyterLab needs --allow-root.
PROJECTOR_SETTINGS := $(CURDIR)/runs/lab-projector
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

setup: $(VENV)/.installed data

# d2l==1.0.3 pins numpy 1.23.5 and friends (no wheels for Python 3.12+); its real imports are
# dependencies of course_lib, so it is installed without its pins.
# requirements.lock pins the exact versions CI last passed with, on LOCK_PYTHON: set-up installs
# with those pins there; another Python gets the loose requirements of pyproject.toml (say so).
# `make lock` re-resolves the loose requirements, writes the lock and runs the tests.
LOCK_PYTHON := 3.11
PYTHON_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
CONSTRAINTS ?= $(if $(filter $(LOCK_PYTHON),$(PYTHON_VERSION)),-c requirements.lock)

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(CONSTRAINTS),,@echo "Python $(PYTHON_VERSION): requirements.lock is for $(LOCK_PYTHON); installing unpinned")
	$(PY) -m pip install --quiet $(CONSTRAINTS) -e '.[test]'
	$(PY) -m pip install --quiet $(CONSTRAINTS) --no-deps d2l==1.0.3
	touch $@

lock:
	rm -rf $(VENV)
	$(MAKE) $(VENV)/.installed CONSTRAINTS=
	{ head -n 2 requirements.lock; $(PY) -m pip freeze --exclude-editable; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
	touch $(VENV)/.installed
	$(MAKE) test

data: $(VENV)/.installed
	$(PY) -m course_lib.data

lab: setup
ifdef PROJECTOR
	rm -rf $(PROJECTOR_SETTINGS) && mkdir -p runs && cp -R lab/projector $(PROJECTOR_SETTINGS)
endif
	$(if $(PROJECTOR),JUPYTERLAB_SETTINGS_DIR=$(PROJECTOR_SETTINGS)) $(VENV)/bin/jupyter lab \
	    --LabApp.app_settings_dir=$(CURDIR)/lab/settings $(ALLOW_ROOT) notebooks/

test: setup
	TQDM_DISABLE=1 COURSE_QUICK=1 MPLBACKEND=Agg $(PY) -m pytest

# Retrain every shipped checkpoint with the command its manifest entry records, then the tables
# measured from them (about 6 hours on a 2-core CPU). The classifier comes first: the other
# models' FIDs use its features. Each command also runs alone; tests/test_checkpoint.py checks
# that this list and the manifest agree. One model goes to runs/ and is not shipped: the pixel
# flow recipe stopped at 2,150 steps, what the latent pipeline's training costs (notebook 11's
# equal-compute row, measured by `latent evaluate`).
checkpoints: setup
	$(PY) -m course_lib.experiments.classifier --model.width 32 --model.dropout 0.3 --epochs 8.0 --batch-size 128 --lr 0.002 --seed 0 --out data/checkpoints/fashion_classifier.pt
	$(PY) -m course_lib.experiments.autoencoder --model.latent-dim 2 --epochs 3 --batch-size 100 --lr 0.001 --loss bce --seed 0 --out data/checkpoints/autoencoder.pt
	$(PY) -m course_lib.experiments.autoencoder --model.latent-dim 16 --epochs 3.0 --batch-size 100 --lr 0.001 --loss bce --seed 0 --out data/checkpoints/autoencoder_16.pt
	$(PY) -m course_lib.experiments.autoencoder --model.latent-dim 2 --epochs 5.0 --batch-size 100 --lr 0.0005 --loss bce --seed 0 --out data/checkpoints/autoencoder_vae_recipe.pt
	$(PY) -m course_lib.experiments.vae fashion --model.latent-dim 2 --epochs 5 --batch-size 100 --lr 0.0005 --recon bce --recon-weight 500.0 --beta 1.0 --seed 0 --dataset Fashion-MNIST --out data/checkpoints/vae_fashion.pt
	$(PY) -m course_lib.experiments.vae compare --seeds 0 1 2 --samples 10000 --far-samples 5000 --bins 50 --out data/results/vae_vs_autoencoder.json
	$(PY) -m course_lib.experiments.faces detector --model.width 16 --images 50000 --test-images 10000 --epochs 4 --batch-size 128 --lr 0.003 --blur 0.5 --seed 0 --dataset cartoon --out data/checkpoints/face_attributes.pt
	$(PY) -m course_lib.experiments.vae faces --model.latent-dim 200 --epochs 5 --batch-size 128 --lr 0.0005 --recon mse --recon-weight 20000.0 --beta 1.0 --images 30000 --seed 0 --dataset cartoon --out data/checkpoints/vae_faces.pt
	$(PY) -m course_lib.experiments.faces evaluate --samples 2000 --vector-images 10000 --edit-faces 500 --scales 1.0 2.0 3.0 4.0 --attributes Eyeglasses Wearing_Hat Smiling Blond_Hair --seed 0 --out data/results/vae_faces.json
	$(PY) -m course_lib.experiments.dcgan --latent-dim 100 --base 32 --image-size 32 --epochs 5 --batch-size 128 --lr 0.0002 --betas 0.5 0.999 --no-saturating --seed 0 --out data/checkpoints/dcgan_fashion.pt
	$(PY) -m course_lib.experiments.mode_collapse --collapsing.lr-G 0.0003 --collapsing.lr-D 0.001 --collapsing.pack 1 --collapsing.r1-gamma 0.0 --hopping.lr-G 0.001 --hopping.lr-D 0.0001 --hopping.pack 1 --hopping.r1-gamma 0.0 --healthy.lr-G 0.001 --healthy.lr-D 0.001 --healthy.pack 1 --healthy.r1-gamma 1.0 --r1.lr-G 0.0003 --r1.lr-D 0.001 --r1.pack 1 --r1.r1-gamma 1.0 --pacgan.lr-G 0.0003 --pacgan.lr-D 0.001 --pacgan.pack 4 --pacgan.r1-gamma 0.0 --latent-dim 256 --batch-size 512 --steps 6000 --every 250 --samples 2500 --kept-samples 400 --seed 0 --more-seeds 1 2 --out data/results/mode_collapse.json
	$(PY) -m course_lib.experiments.ddpm train --model.base 32 --model.channel-mults 1 2 2 --model.depth 1 --model.attention-resolutions 7 8 --model.image-size 28 --model.dropout 0.0 --model.num-steps 1000 --schedule cosine --prediction epsilon --steps 6000 --batch-size 64 --lr 0.001 --weight-decay 0.0001 --warmup 300 --grad-clip 1.0 --ema 0.999 --seed 0 --out data/checkpoints/ddpm_fashion.pt --threads 2
	$(PY) -m course_lib.experiments.ddpm fid --rows ddpm_1000 ddim_10 ddim_25 ddim_50 ddim_100 large --samples 1000 --large-samples 10000 --large-row ddim_50 --seed 0 --threads 2
	$(PY) -m course_lib.experiments.ddpm fid --record
	$(PY) -m course_lib.experiments.flow train --model.base 32 --model.channel-mults 1 2 2 --model.depth 1 --model.attention-resolutions 7 8 --model.image-size 28 --model.dropout 0.0 --model.num-steps 1000 --steps 6000 --batch-size 64 --lr 0.001 --weight-decay 0.0001 --warmup 300 --grad-clip 1.0 --ema 0.999 --seed 0 --out data/checkpoints/flow_fashion.pt --threads 1
	$(PY) -m course_lib.experiments.flow nfe --model data/checkpoints/flow_fashion.pt --ddpm data/checkpoints/ddpm_fashion.pt --samplers euler heun ddim --nfes 1 2 4 10 25 50 100 --samples 1000 --batch-size 100 --seed 0 --threads 2
	$(PY) -m course_lib.experiments.flow reflow --base data/checkpoints/flow_fashion.pt --model.base 32 --model.channel-mults 1 2 2 --model.depth 1 --model.attention-resolutions 7 8 --model.image-size 28 --model.dropout 0.0 --model.num-steps 1000 --pairs 8000 --pair-steps 25 --pair-sampler heun --pair-batch-size 500 --steps 2000 --batch-size 64 --lr 0.0002 --weight-decay 0.0001 --warmup 100 --grad-clip 1.0 --ema 0.999 --seed 0 --out data/checkpoints/flow_fashion_reflow.pt --device cpu --threads 1
	$(PY) -m course_lib.experiments.flow nfe --model data/checkpoints/flow_fashion_reflow.pt --samplers euler heun --nfes 1 2 4 10 --samples 1000 --batch-size 100 --seed 0 --threads 1
	$(PY) -m course_lib.experiments.latent autoencoder --width 32 --latent-channels 4 --kl-weight 0.0001 --epochs 2.0 --batch-size 128 --lr 0.001 --warmup 100 --grad-clip 1.0 --seed 0 --out data/checkpoints/latent_autoencoder.pt --threads 1
	$(PY) -m course_lib.experiments.latent train --autoencoder data/checkpoints/latent_autoencoder.pt --scale --model.base 32 --model.channel-mults 1 2 2 --model.depth 1 --model.attention-resolutions 4 2 --model.image-size 8 --model.dropout 0.0 --model.num-steps 1000 --images 60000 --steps 6000 --batch-size 64 --lr 0.001 --weight-decay 0.0001 --warmup 300 --grad-clip 1.0 --ema 0.999 --seed 0 --out data/checkpoints/latent_flow.pt --threads 1
	$(PY) -m course_lib.experiments.latent train --autoencoder data/checkpoints/latent_autoencoder.pt --no-scale --model.base 32 --model.channel-mults 1 2 2 --model.depth 1 --model.attention-resolutions 4 2 --model.image-size 8 --model.dropout 0.0 --model.num-steps 1000 --images 60000 --steps 6000 --batch-size 64 --lr 0.001 --weight-decay 0.0001 --warmup 300 --grad-clip 1.0 --ema 0.999 --seed 0 --out data/checkpoints/latent_flow_unscaled.pt --threads 1
	$(PY) -m course_lib.experiments.flow train --model.base 32 --model.channel-mults 1 2 2 --model.depth 1 --model.attention-resolutions 7 8 --model.image-size 28 --model.dropout 0.0 --model.num-steps 1000 --steps 2150 --batch-size 64 --lr 0.001 --weight-decay 0.0001 --warmup 300 --grad-clip 1.0 --ema 0.999 --seed 0 --out runs/flow_fashion_equal_compute.pt --threads 1
	$(PY) -m course_lib.experiments.latent evaluate --models data/checkpoints/latent_flow.pt data/checkpoints/latent_flow_unscaled.pt --pixel-models data/checkpoints/flow_fashion.pt runs/flow_fashion_equal_compute.pt --steps 10 25 50 --samples 1000 --timing-steps 10 --seed 0 --out data/results/latent_vs_pixel.json --threads 2
	$(PY) -m course_lib.experiments.leaderboard
	$(PY) -m course_lib.experiments.text2image train fashion base --schedule cosine --batch-size 64 --lr 0.001 --weight-decay 0.0001 --warmup 200 --grad-clip 1.0 --p-uncond 0.1 --seed 0 --steps 15000 --ema 0.9995 --model.base 32 --model.channel-mults 1 2 2 --model.depth 1 --model.attention-resolutions 8 4 --model.image-size 16 --model.dropout 0.0 --model.num-steps 1000 --model.low-res-size none --model.prediction v --dataset fashion --stage base --encoder minilm --encoder-layers 6 --channels 1 --out data/checkpoints/t2i_fashion_base_minilm.pt --threads 1
	$(PY) -m course_lib.experiments.text2image train fashion base --schedule cosine --batch-size 64 --lr 0.001 --weight-decay 0.0001 --warmup 200 --grad-clip 1.0 --p-uncond 0.1 --seed 0 --steps 4000 --ema 0.999 --model.base 32 --model.channel-mults 1 2 2 --model.depth 1 --model.attention-resolutions 8 4 --model.image-size 16 --model.dropout 0.0 --model.num-steps 1000 --model.low-res-size none --model.prediction epsilon --dataset fashion --stage base --encoder scratch --encoder-layers 6 --channels 1 --out data/checkpoints/t2i_fashion_base_scratch.pt --threads 2
	$(PY) -m course_lib.experiments.text2image train fashion sr --schedule cosine --batch-size 64 --lr 0.001 --weight-decay 0.0001 --warmup 200 --grad-clip 1.0 --p-uncond 0.1 --seed 0 --steps 4500 --ema 0.999 --model.base 32 --model.channel-mults 1 2 2 2 --model.depth 1 --model.attention-resolutions 8 4 --model.image-size 32 --model.dropout 0.0 --model.num-steps 1000 --model.low-res-size 16 --model.prediction v --dataset fashion --stage sr --encoder minilm --encoder-layers 6 --channels 1 --out data/checkpoints/t2i_fashion_sr_minilm.pt --threads 1
	$(PY) -m course_lib.experiments.text2image train shapes base --schedule cosine --batch-size 64 --lr 0.001 --weight-decay 0.0001 --warmup 200 --grad-clip 1.0 --p-uncond 0.1 --seed 0 --steps 15000 --ema 0.9995 --model.base 32 --model.channel-mults 1 2 2 --model.depth 1 --model.attention-resolutions 8 4 --model.image-size 16 --model.dropout 0.0 --model.num-steps 1000 --model.low-res-size none --model.prediction v --dataset shapes --stage base --encoder minilm --encoder-layers 6 --channels 3 --out data/checkpoints/t2i_shapes_base_minilm.pt --threads 1
	$(PY) -m course_lib.experiments.text2image train shapes base --schedule cosine --batch-size 64 --lr 0.001 --weight-decay 0.0001 --warmup 200 --grad-clip 1.0 --p-uncond 0.1 --seed 0 --steps 4000 --ema 0.999 --model.base 32 --model.channel-mults 1 2 2 --model.depth 1 --model.attention-resolutions 8 4 --model.image-size 16 --model.dropout 0.0 --model.num-steps 1000 --model.low-res-size none --model.prediction epsilon --dataset shapes --stage base --encoder scratch --encoder-layers 6 --channels 3 --out data/checkpoints/t2i_shapes_base_scratch.pt --threads 2
	$(PY) -m course_lib.experiments.text2image train shapes sr --schedule cosine --batch-size 64 --lr 0.001 --weight-decay 0.0001 --warmup 200 --grad-clip 1.0 --p-uncond 0.1 --seed 0 --steps 4500 --ema 0.999 --model.base 32 --model.channel-mults 1 2 2 2 --model.depth 1 --model.attention-resolutions 8 4 --model.image-size 32 --model.dropout 0.0 --model.num-steps 1000 --model.low-res-size 16 --model.prediction v --dataset shapes --stage sr --encoder minilm --encoder-layers 6 --channels 3 --out data/checkpoints/t2i_shapes_sr_minilm.pt --threads 1
	$(PY) -m course_lib.experiments.text2image evaluate --per-class 50 --shapes-n 200 --scales 1.0 2.0 3.0 5.0 8.0 --w-heldout 3.0 --steps 25 --sr-steps 25 --out data/checkpoints/t2i_eval.json
	$(PY) -m course_lib.experiments.text2image_eval diversity --scales 0.0 1.0 3.0 8.0 --per-prompt 10 --seeds 0 1 2 3 4 --steps 25 --sr-steps 25 --out data/results/t2i_guidance_diversity.json
	$(PY) -m course_lib.experiments.text2image_eval sr --per-class 50 --w 3.0 --steps 25 --sr-steps 25 --seed 0 --aug-levels 0.0 0.1 0.2 0.3 0.5 --out data/results/t2i_sr_effect.json
	$(PY) -m course_lib.experiments.text2image_eval grid --per-class 50 --w 3.0 --steps 25 --sr-steps 25 --seed 0 --out data/results/t2i_sampler_grid.json
	$(PY) -m course_lib.experiments.text2image_eval stages --n 200 --w 3.0 --steps 25 --sr-steps 25 --seed 0 --label shipped --out data/results/t2i_shapes_stages.json
	$(PY) -m course_lib.experiments.layout fit --layers 2 3 4 --images 3000 --test-images 1000 --steps 300 --l2 0.001 --seed 0 --out data/checkpoints/t2i_shapes_role_head.pt
	$(PY) -m course_lib.experiments.layout evaluate --n 200 --scales 2.0 3.0 --etas 0.0 10.0 40.0 --guided-steps 10 --steps 25 --sr-steps 25 --seeds 0 1 2 --head data/checkpoints/t2i_shapes_role_head.pt --out data/results/t2i_layout_guidance.json
	$(PY) -m course_lib.experiments.normalization --batch-sizes 32 8 2 --images 1500 --epochs 2.0 --seeds 0 1 2 --width 16 --depth 1 --groups 4 --base-lr 0.05 --out data/results/normalization_batch_size.json

# Time to quality (README, "Benchmarks"): the DDPM recipe on our U-Net and on diffusers'
# UNet2DModel (about 1 h 40 min on 2 cores for both), the FID of every second snapshot and of
# those around the shipped model's FID (1,000 DDIM-50 samples each), then the paired timing and
# the minutes to each FID level.
TTQ := $(PY) -m course_lib.experiments.time_to_quality
time-to-quality: setup
	$(TTQ) train --net ours
	$(TTQ) train --net diffusers
	$(TTQ) evaluate --stride 2
	$(TTQ) evaluate --steps 4500 5500
	$(TTQ) evaluate --debias --stride 2
	$(TTQ) evaluate --debias --steps 4500 5500
	$(TTQ) report

# network candidates: AdaGN against the shipped network's peer run, and AdaGN with widths
# 32/64/96 against the UNet2DModel closest to it in size (widths 32/48/56, a run of its own)
time-to-quality-candidates: time-to-quality
	$(TTQ) train --net ours --recipe.model.adaptive-norm --run-dir runs/ttq_adagn
	$(TTQ) evaluate --debias --nets ours --recipe.model.adaptive-norm --run-dir runs/ttq_adagn --steps 1000 2000 3000 4000 4500 5000 5500 6000 --out data/results/time_to_quality_adagn.json
	$(TTQ) evaluate --debias --nets diffusers --steps 1000 2000 3000 4000 4500 5000 5500 6000 --out data/results/time_to_quality_adagn.json
	$(TTQ) report --recipe.model.adaptive-norm --levels 20 10 6.5 4.103 --out data/results/time_to_quality_adagn.json
	$(TTQ) train --net ours --recipe.model.adaptive-norm --recipe.model.channel-mults 1 2 3 --run-dir runs/ttq_adagn123
	$(TTQ) evaluate --nets ours --recipe.model.adaptive-norm --recipe.model.channel-mults 1 2 3 --run-dir runs/ttq_adagn123 --steps 1000 2000 3000 4000 4500 5000 5500 6000 --out data/results/time_to_quality_adagn_123.json
	$(TTQ) evaluate --debias --nets ours --recipe.model.adaptive-norm --recipe.model.channel-mults 1 2 3 --run-dir runs/ttq_adagn123 --steps 1000 2000 3000 4000 4500 5000 5500 6000 --out data/results/time_to_quality_adagn_123.json
	$(TTQ) train --net diffusers --peer-widths 32 48 56 --run-dir runs/ttq_adagn123
	$(TTQ) evaluate --nets diffusers --peer-widths 32 48 56 --run-dir runs/ttq_adagn123 --steps 1000 2000 3000 4000 4500 5000 5500 6000 --out data/results/time_to_quality_adagn_123.json
	$(TTQ) evaluate --debias --nets diffusers --peer-widths 32 48 56 --run-dir runs/ttq_adagn123 --steps 1000 2000 3000 4000 4500 5000 5500 6000 --out data/results/time_to_quality_adagn_123.json
	$(TTQ) report --recipe.model.adaptive-norm --recipe.model.channel-mults 1 2 3 --peer-widths 32 48 56 --timing-repeats 15 --levels 20 10 6.5 3.813 3.631 --out data/results/time_to_quality_adagn_123.json

clean-venv:
	rm -rf $(VENV)
