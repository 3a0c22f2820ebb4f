# The two commands of the README: `make demo` and `make test` (and `make docs`). Everything installs into .venv.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# Two cores: nbdev_test runs two notebooks at once, so each gets one thread.
THREADS := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

.PHONY: install demo test sync check-sync nbtest pytest docs screenshots clean

$(BIN)/.installed: settings.ini setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(THREADS) $(BIN)/pmal-reproduce demo

# The papermill templates ship inside the package (pmal/templates/, package data): a byte-for-byte copy of nbs/experiments/.
TEMPLATES := run tables figures

sync: install
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export
	for t in $(TEMPLATES); do cp nbs/experiments/$$t.ipynb pmal/templates/$$t.ipynb; done

check-sync: sync
	@git diff --exit-code -- nbs pmal || { echo "Notebooks are not clean, or pmal/ (code or templates) is out of sync: run make sync (nbdev_clean, nbdev_export, template copy) and commit."; exit 1; }
	@test -z "$$(git status --porcelain --untracked-files=all -- pmal)" || { git status --short -- pmal; echo "nbdev_export or the template copy wrote files that are not committed."; exit 1; }

nbtest: install
	$(THREADS) $(BIN)/nbdev_test --n_workers 2 --timing

pytest: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile tests

test: check-sync nbtest pytest

# The documentation site (Sphinx + MyST-NB, the notebooks as stored, never executed) into _docs/; docs/build.py says more.
$(BIN)/.docs-installed: $(BIN)/.installed settings.ini setup.py
	$(PY) -m pip install -q -e ".[dev,docs]"
	touch $@

docs: $(BIN)/.docs-installed
	$(THREADS) $(PY) docs/build.py _docs

# Screenshots of the built site at 1280 px in headless Chromium (Debian's chromium package), into _screenshots/.
screenshots:
	$(PY) docs/screenshots.py --site _docs --out _screenshots

# results/ holds the committed result records: never cleaned
clean:
	rm -rf $(VENV) runs _proc _docs _screenshots
