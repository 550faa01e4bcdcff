# galip: two commands on a fresh machine, `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --quiet --disable-pip-version-check
DEMO   := demo_out

.PHONY: test demo demo-bundle bench gpu-check clean

# Each stamp records which extras are installed; it is redone when packaging changes.
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-test: pyproject.toml setup.py | $(VENV)/bin/python
	$(PIP) install -e '.[cpu,train,data,bench,dev,bids,ray]'
	@touch $@

$(VENV)/.stamp-demo: pyproject.toml setup.py | $(VENV)/bin/python
	$(PIP) install -e '.[cpu,data,preview]'
	@touch $@

test: $(VENV)/.stamp-test
	$(VENV)/bin/pytest -q

SHIPPED_BUNDLE := runtime/bundles/demo/manifest.json

demo: $(VENV)/.stamp-demo
	$(VENV)/bin/galip-data --out $(DEMO)/data --subjects 1 --spacing 2 --seed 0 --overwrite
	@if [ -f $(SHIPPED_BUNDLE) ]; then \
		$(VENV)/bin/galip-run $(DEMO)/data/sub-000/sub-000_T1w.nii.gz --to T2 \
			--out $(DEMO)/sub-000_T2_galip.nii.gz --preview $(DEMO)/sub-000_T2_galip.png --overwrite; \
	else \
		echo "demo: sample volume written to $(DEMO)/data; no demo bundle is shipped yet, so no translation (train with galip-train, export with galip-export, then galip-run --bundle DIR)"; \
	fi

# Re-makes the shipped demo bundle (small clip-free generator; ~1 h on 2 cores, resumable).
demo-bundle: $(VENV)/.stamp-test
	$(PY) -m galip.export.demo_bundle --work $(DEMO)/bundle_work --bundle runtime/bundles/demo

bench: $(VENV)/.stamp-test
	$(VENV)/bin/galip-bench --quick --out bench/results

# Runs the LMI CUDA kernel through CuPy against the PyTorch LMI (needs a GPU machine).
gpu-check: $(VENV)/.stamp-test
	$(VENV)/bin/pytest -q -m gpu tests

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info
