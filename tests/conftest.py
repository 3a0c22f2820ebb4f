"""Fixtures shared by the package-level tests: a tiny digits profile, and `pmal-reproduce` as a user starts it, in a
child process with one torch thread."""
import os, sys

import pytest

TINY = "base: quick\nepochs: 2\ntsne_samples: 200\n"


@pytest.fixture(scope='session')
def tiny(tmp_path_factory):
    "A YAML profile: the quick profile with 2 epochs (a digits run trains in about a second)."
    path = tmp_path_factory.mktemp('profile') / 'tiny.yaml'
    path.write_text(TINY)
    return str(path)


@pytest.fixture(scope='session')
def driver():
    "The `pmal-reproduce` command line, started from this interpreter (no console script needed on PATH)."
    return [sys.executable, '-c', 'import sys; from pmal.cli import main; sys.exit(main())']


@pytest.fixture(scope='session')
def child_env():
    "The environment of a child process: this one, with one torch thread."
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
