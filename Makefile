# owl-jax: `make demo` and `make test` are all a newcomer needs.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install system-deps test demo bench clean

$(VENV)/.installed: setup.py requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.lock
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed
	@echo "owl-jax is installed in $(VENV): '. $(VENV)/bin/activate' puts owl-convert, owl-generate, owl-data, owl-train, owl-eval and owl-serve on PATH"

# The browser test's chromium (Debian packages), installed where missing and possible (root).
system-deps:
	@if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; fi

test: install system-deps
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

demo: install
	$(PY) -m owl_jax.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) *.egg-info demo_out
