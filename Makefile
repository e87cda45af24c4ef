# The two commands of README.md: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-long setup browser docs docs-serve gpu-wheels gpu-check gpu-bench gpu-test

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/synfer demo

# The docs site (mkdocs.yml): references generated from the code; strict, so a broken link or
# anchor fails the build. The variables quiet the banners two of MkDocs' plugins print.
MKDOCS := NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(VENV)/bin/mkdocs

docs: $(STAMP)
	$(MKDOCS) build --strict

docs-serve: $(STAMP)
	$(MKDOCS) serve --strict --dev-addr 127.0.0.1:8001

# Headless Chromium for the web-page test (Debian's package; needs root, else that test skips).
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# `make test` runs the suite without the tests marked long (what CI runs); `make test-long` runs the
# long ones (the scaled-down study). Their durations are in docs/results/benchmarks.md.
test: $(STAMP) browser
	$(VENV)/bin/python -m pytest -m "not long" $(PYTEST_ARGS)

test-long: $(STAMP)
	$(VENV)/bin/python -m pytest -m long $(PYTEST_ARGS)

# --- The GPU check (cluster/gpu/README.md, docs/development/gpu-check.md) ------------------------
# For any CUDA host. A host without network access that has Python and a CUDA torch but not Ray,
# diffusers or DeepSpeed is served by the wheel archive: `make gpu-wheels` (on a machine with the
# package index) packs what such a host lacks into build/gpu-wheels/site.tar.xz (PY=3.11 for
# another Python: build/gpu-wheels-py311); copy it with the source tree, then on the host:
#   make gpu-check   every stage on CUDA in fp16, one PASS/FAIL line per stage (cluster/gpu/check.py)
#   make gpu-bench   benchmarks/bench_gpu.py: an SD 1.5-layout bundle at 512x512 against diffusers
#   make gpu-test    the tests marked gpu (less those also marked slow)
# Each unpacks the archive into a temporary folder and puts it and this tree on PYTHONPATH; nothing
# is installed. Without make: bash cluster/gpu/with-wheels.sh ARCHIVE SCRIPT|-m MODULE [ARGS...].
# GPU_PYTHON picks the host's interpreter; GPU_CHECK_ARGS / GPU_BENCH_ARGS replace the arguments.
# A CPU rehearsal (GPU_PYTHON: a venv holding only a bare host's packages, see the guide):
#   make gpu-wheels PY=3.11 && make gpu-check PY=3.11 GPU_PYTHON=/tmp/hostvenv/bin/python GPU_CHECK_ARGS="--device cpu"
PY ?= 3.12
GPU_WHEELS := build/gpu-wheels$(if $(filter 3.12,$(PY)),,-py$(subst .,,$(PY)))
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?= --device cuda --precision fp16
GPU_BENCH_ARGS ?= --device cuda --precision fp16 --arch sd15 --resolution 512

gpu-wheels: $(STAMP)
	$(VENV)/bin/python cluster/gpu/wheels.py build --python $(PY) --out $(GPU_WHEELS)

gpu-check:
	GPU_PYTHON=$(GPU_PYTHON) bash cluster/gpu/with-wheels.sh $(GPU_WHEELS)/site.tar.xz cluster/gpu/check.py $(GPU_CHECK_ARGS)

gpu-bench:
	GPU_PYTHON=$(GPU_PYTHON) bash cluster/gpu/with-wheels.sh $(GPU_WHEELS)/site.tar.xz benchmarks/bench_gpu.py $(GPU_BENCH_ARGS)

gpu-test:
	GPU_PYTHON=$(GPU_PYTHON) bash cluster/gpu/with-wheels.sh $(GPU_WHEELS)/site.tar.xz -m pytest -p no:cacheprovider -m "gpu and not slow" tests/test_gpu.py
