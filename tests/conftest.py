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


# pytest-xdist (`--dist loadfile`) hands whole files to the two workers in collection order; the files that train
# through papermill kernels and subprocesses take most of the time, so they are collected first and the two workers
# finish together (otherwise the longest file could start last, with the other worker idle).
LONGEST_FIRST = ['test_reproduction.py', 'test_faults.py', 'test_pipeline.py', 'test_distributed.py', 'test_train.py',
                 'test_packaging.py', 'test_methods.py']


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
