# The two commands of README.md: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-long setup browser gpu-wheels gpu-check gpu-bench gpu-test

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/synfer demo

# Headless Chromium for the web-page test (Debian's package; needs root, else that test skips).
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# The suite without the tests marked long: about 52 min of pytest on a 2-core host at half the
# brief's speed (README, "Two commands"); CI allows 90 with set-up. The scaled-down study (long:
# eight trainings and five generations, 11 min there) runs with `make test-long`.
test: $(STAMP) browser
	$(VENV)/bin/python -m pytest -m "not long" $(PYTEST_ARGS)

test-long: $(STAMP)
	$(VENV)/bin/python -m pytest -m long $(PYTEST_ARGS)

# --- The GPU check (issue 16; cluster/gpu/README.md) ---------------------------------------------
# A GPU machine lent to a session has Python 3.12 and torch but no Ray, diffusers or DeepSpeed, and
# no network: `make gpu-wheels` (here) packs what it lacks into build/gpu-wheels/site.tar.xz, sized
# to travel with the working tree; `make gpu-check` (there) unpacks it and runs every stage on CUDA
# in fp16, one PASS/FAIL line per stage; `make gpu-bench` runs benchmarks/bench_gpu.py and
# `make gpu-test` the tests marked gpu the same way.
# The session's device tool calls (the same as `make gpu-check` / `make gpu-bench`, without make):
#   run(command="bash cluster/gpu/with-wheels.sh build/gpu-wheels/site.tar.xz cluster/gpu/check.py",
#       carry=["build/gpu-wheels"], timeout_s=600)
#   run(command="bash cluster/gpu/with-wheels.sh build/gpu-wheels/site.tar.xz benchmarks/bench_gpu.py",
#       carry=["build/gpu-wheels"], timeout_s=300)
# A CPU dry run here (GPU_PYTHON: a venv holding only the device's packages, see the README):
#   make gpu-wheels PY=3.11 && make gpu-check PY=3.11 GPU_PYTHON=/tmp/devvenv/bin/python GPU_CHECK_ARGS="--device cpu"
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
