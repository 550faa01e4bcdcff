# galip: two commands on a fresh machine, `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --quiet --disable-pip-version-check
DEMO   := demo_out
QUALITY := quality

.PHONY: test demo demo-bundle quality bench gpu-check clean

# Each stamp records which extras are installed; it is redone when packaging changes.
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-test: pyproject.toml setup.py | $(VENV)/bin/python
	$(PIP) install -e '.[cpu,train,data,bench,dev,bids,ray]'
	@touch $@

$(VENV)/.stamp-demo: pyproject.toml setup.py | $(VENV)/bin/python
	$(PIP) install -e '.[cpu,data,preview]'
	@touch $@

$(VENV)/.stamp-quality: pyproject.toml setup.py | $(VENV)/bin/python
	$(PIP) install -e '.[cpu,data,bench]'
	@touch $@

test: $(VENV)/.stamp-test
	$(VENV)/bin/pytest -q

SHIPPED_BUNDLE := runtime/bundles/demo/manifest.json
# make demo previews the diffusion model on a slab (a whole volume takes minutes on 2 cores)
DIFFUSION_SLAB := 44:52

demo: $(VENV)/.stamp-demo
	$(VENV)/bin/galip-data --out $(DEMO)/data --subjects 1 --spacing 2 --seed 0 --overwrite
	@if [ -f $(SHIPPED_BUNDLE) ]; then \
		$(VENV)/bin/galip-run $(DEMO)/data/sub-000/sub-000_T1w.nii.gz --to T2 \
			--out $(DEMO)/sub-000_T2_galip.nii.gz --preview $(DEMO)/sub-000_T2_galip.png --overwrite; \
		if grep -q '"diffusion"' $(SHIPPED_BUNDLE); then \
			$(VENV)/bin/galip-run $(DEMO)/data/sub-000/sub-000_T1w.nii.gz --to T2 --model diffusion \
				--slices $(DIFFUSION_SLAB) --out $(DEMO)/sub-000_T2_midiffusion_slab.nii.gz \
				--preview $(DEMO)/sub-000_T2_midiffusion_slab.png --overwrite; \
		fi; \
	else \
		echo "demo: sample volume written to $(DEMO)/data; no demo bundle is shipped yet, so no translation (train with galip-train, export with galip-export, then galip-run --bundle DIR)"; \
	fi

# Re-makes the shipped demo bundle (small clip-free generator, about 40 min on one core, then the
# T2 score network, about 90 min; resumable). A re-made generator differs from the shipped one (docs/training.md).
demo-bundle: $(VENV)/.stamp-test
	$(PY) -m galip.export.demo_bundle --work $(DEMO)/bundle_work --bundle runtime/bundles/demo

# The shipped bundle against training-free baselines on held-out phantoms: 3 subjects at 2 mm,
# seed 123 (the demo bundle trains on seed 1). Writes $(QUALITY)/quality.{json,md} and montage.png.
# More runtime options: make quality QUALITY_ARGS="--run-option threads=1"
quality: $(VENV)/.stamp-quality
	$(VENV)/bin/galip-eval quality runtime/bundles/demo --out $(QUALITY) --subjects 3 --seed 123 --spacing 2 \
		--overwrite $(QUALITY_ARGS)
	@if grep -q '"diffusion"' $(SHIPPED_BUNDLE); then \
		$(VENV)/bin/galip-eval quality runtime/bundles/demo --out $(QUALITY)/diffusion --data $(QUALITY)/data \
			--model diffusion --slices $(DIFFUSION_SLAB) --overwrite $(QUALITY_ARGS); \
	fi

bench: $(VENV)/.stamp-test
	$(VENV)/bin/galip-bench --quick --out bench/results

# One prepared check of the GPU path: a PASS/FAIL/SKIP line per item (bench/gpu_check.py).
# Installs nothing and needs no network: .venv's python where galip imports, else $(PYTHON)
# straight from the checkout. Without a GPU every item SKIPs and it exits 0.
gpu-check:
	@PY=$(PY); $$PY -c 'import galip.runtime' 2>/dev/null || PY=$(PYTHON); $$PY bench/gpu_check.py

clean:
	rm -rf $(VENV) $(DEMO) $(QUALITY) build *.egg-info
