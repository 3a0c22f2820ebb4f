"""Fixtures shared by the package-level tests: a tiny digits profile, `pmal-reproduce` as a user starts it, in a
child process with one torch thread, and the benchmark scripts loaded as modules."""
import importlib.util
import os, sys
from pathlib import Path

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


def load_benchmark(name):
    "benchmarks/<name>.py as a module (the scripts are not a package), to test their functions."
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / 'benchmarks' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
