# Two commands do all set-up on a fresh machine:
#   make demo   venv + install, tiny offline models, the main job on bundled photos (local Ray)
#   make test   venv + install, the test suite (offline, local Ray)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch torchvision
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test schemas clean

# pip writes the bytecode of what it installs one file at a time; compileall writes it on every core (~20 s less of
# ~3.5 min here). Like pip, it leaves alone the files this Python cannot compile (test files for newer Pythons).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile $(TORCH)
	$(PY) -m pip install -q --no-compile -e ".[test]"
	$(PY) -c "import compileall, sys; compileall.compile_dir(sys.argv[1], quiet=2, workers=0)" $(VENV)/lib
	touch $@

# rerun when the factories change (a new model, e.g. a captioner): make-tiny rewrites the set if its marker
# differs and leaves a complete one as it is
models/tiny/tiny_models.json: $(VENV)/.installed $(wildcard pipeline/testing/*.py)
	$(PY) -m pipeline models make-tiny models/tiny
	touch $@

demo: $(VENV)/.installed models/tiny/tiny_models.json
	$(PY) -m pipeline run jobs/configs/demo.yaml
	@echo "output: $(CURDIR)/out/demo (samples/, errors/, manifest.json)"

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=15

schemas: $(VENV)/.installed
	$(PY) -m pipeline schemas

clean:
	rm -rf out models
