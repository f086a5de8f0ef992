# Two entry points: `make demo` (install, then run a real job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test host host-test venv kernel lint check clean install install-site

demo: host venv
	@$(BIN)/apppot kernel build || echo "apppot: AppPot's kernel could not be built (the reason is above); jobs run on Debian's kernel"
	mkdir -p demo-job
	printf 'hello from the host\n' > demo-job/input.dat
	cd demo-job && ../$(BIN)/apppot start -- sh -c 'wc -c < input.dat > result.txt; echo "job ran on $$(uname -sr) as $$(id -un)"'
	@echo "result.txt (written by the job): $$(cat demo-job/result.txt)"
	@echo "apppot is $(CURDIR)/$(BIN)/apppot (not on your PATH); 'make install' installs it for you as ~/.local/bin/apppot"

test: host-test venv lint kernel
	APPPOT_TEST_REQUIRE_OWN_KERNEL=1 $(BIN)/pytest

# The tests run on AppPot's kernel too, so for them a failed build is a failure.
kernel: venv
	$(BIN)/apppot kernel build

host:
	$(PYTHON) tools/host_setup.py

# AppPot for every user (as root: PREFIX=/opt/apppot BINDIR=/usr/local/bin; /usr/local unless given), or
# for yourself (make install: ~/.local unless given): the package under PREFIX/lib/apppot run by the
# system's Python, apppot, apppot-start, apppot-snap in PREFIX/bin. No virtualenv, no root for your own.
# PREFIX counts only on make's command line: conda-build and Termux export PREFIX for their own use.
ifneq ($(filter environment%,$(origin PREFIX)),)
PREFIX_IGNORED := $(PREFIX)
override PREFIX :=
endif
PREFIX_NOTE = $(if $(PREFIX_IGNORED),echo "note: PREFIX=$(PREFIX_IGNORED) in the environment is not used; to install there: make $@ PREFIX=$(PREFIX_IGNORED)" >&2 &&)
install:
	@$(PREFIX_NOTE) umask 022 && PYTHONPATH=src $(PYTHON) -m apppot.install --prefix "$(or $(PREFIX),$(HOME)/.local)" $(if $(BINDIR),--bindir "$(BINDIR)")

install-site:
	$(PREFIX_NOTE) umask 022 && PYTHONPATH=src $(PYTHON) -m apppot.install --prefix "$(or $(PREFIX),/usr/local)" $(if $(BINDIR),--bindir "$(BINDIR)")

host-test:
	$(PYTHON) tools/host_setup.py --test

venv: $(BIN)/apppot

$(BIN)/apppot: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -m compileall -q src  # bytecode, even where PYTHONDONTWRITEBYTECODE is set: faster job starts
	touch $@

lint:
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools
	$(BIN)/mypy
	shellcheck -s sh src/apppot/guest/apppot-init src/apppot/guest/apppot-boot src/apppot/guest/udhcpc.script examples/validate/apppot-run examples/glpk/autorun.sh examples/glpk/glpsol-apppot src/apppot/data/rte/APPPOT-0 examples/grid/A3D_UML examples/grid/apppot-run

clean:
	rm -rf $(VENV) demo-job
