# The two commands of the README: `make demo` and `make test`. Everything installs into .venv.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# Two cores: nbdev_test runs two notebooks at once, so each gets one thread.
THREADS := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

.PHONY: install demo test check-sync nbtest pytest clean

$(BIN)/.installed: settings.ini setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(THREADS) $(BIN)/pmal-reproduce demo

check-sync: install
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export
	@git diff --exit-code -- nbs pmal || { echo "Notebooks are not clean or pmal/ is out of sync: run nbdev_clean && nbdev_export and commit."; exit 1; }
	@test -z "$$(git status --porcelain --untracked-files=all -- pmal)" || { git status --short -- pmal; echo "nbdev_export wrote files that are not committed."; exit 1; }

nbtest: install
	$(THREADS) $(BIN)/nbdev_test --n_workers 2 --timing

pytest: install
	OMP_NUM_THREADS=2 $(PY) -m pytest -q tests

test: check-sync nbtest pytest

clean:
	rm -rf $(VENV) runs results
