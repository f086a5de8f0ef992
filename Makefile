# Two entry points: `make demo` (install, then run a real job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test host host-test venv lint check clean

demo: host venv
	mkdir -p demo-job
	printf 'hello from the host\n' > demo-job/input.dat
	cd demo-job && ../$(BIN)/apppot start -- sh -c 'wc -c < input.dat > result.txt; echo "job ran on $$(uname -sr) as $$(id -un)"'
	@echo "result.txt (written by the job): $$(cat demo-job/result.txt)"

test: host-test venv lint
	$(BIN)/pytest

host:
	$(PYTHON) tools/host_setup.py

host-test:
	$(PYTHON) tools/host_setup.py --test

venv: $(BIN)/apppot

$(BIN)/apppot: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

lint:
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools
	$(BIN)/mypy
	shellcheck -s sh src/apppot/guest/apppot-init

clean:
	rm -rf $(VENV) demo-job
