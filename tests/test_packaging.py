"""What a user who installs pmal gets: the wheel and the sdist carry the modules, the papermill templates and the
`pmal-reproduce` entry point, and a wheel installed on its own (no checkout beside it) runs `pmal-reproduce run`."""
import json, os, signal, subprocess, sys, tarfile, zipfile
from pathlib import Path

import pytest

from pmal.driver import TEMPLATES

ROOT = Path(__file__).resolve().parents[1]


def _run(args, timeout=300, **kw):
    "Run a command in its own session; on a timeout, end it with everything it started (a papermill kernel too)."
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    try: out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    r = subprocess.CompletedProcess(args, proc.returncode, out, err)
    assert r.returncode == 0, f"{' '.join(map(str, args))}\n{out[-3000:]}\n{err[-3000:]}"
    return r


def _pip(*args):
    "pip of the test environment: no index, no build isolation (setuptools comes from the dev extras), quiet."
    return _run([sys.executable, '-m', 'pip', *args, '-q', '--no-deps', '--no-index', '--disable-pip-version-check'])


@pytest.fixture(scope='module')
def checkout(tmp_path_factory):
    "The files a commit of this working tree would carry (tracked, and untracked but not ignored), copied elsewhere."
    try: listed = _run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=ROOT).stdout
    except (FileNotFoundError, AssertionError): pytest.skip('needs a git checkout')
    dst = tmp_path_factory.mktemp('checkout')
    for name in filter(None, listed.split('\0')):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            (dst / name).write_bytes(src.read_bytes())
    return dst


@pytest.fixture(scope='module')
def wheel(checkout, tmp_path_factory):
    "`pip wheel .` in that copy."
    out = tmp_path_factory.mktemp('wheel')
    _pip('wheel', '--no-build-isolation', '-w', out, checkout)
    (whl,) = out.glob('pmal-*.whl')
    return whl


def _contents(archive, prefix=''):
    "{path inside the package: bytes} of a wheel (zip) or an sdist (tar.gz, paths below its top folder)."
    if str(archive).endswith('.whl'):
        with zipfile.ZipFile(archive) as z: return {n: z.read(n) for n in z.namelist() if not n.endswith('/')}
    with tarfile.open(archive) as t:
        return {m.name.split('/', 1)[1]: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}


def test_packaged_templates_are_copies_of_nbs_experiments():
    for t in TEMPLATES:
        assert (ROOT / 'pmal' / 'templates' / f'{t}.ipynb').read_bytes() == (ROOT / 'nbs' / 'experiments' / f'{t}.ipynb').read_bytes(), \
            f"pmal/templates/{t}.ipynb differs from nbs/experiments/{t}.ipynb: run `make sync`"


def test_wheel_carries_modules_templates_and_entry_point(wheel):
    files = _contents(wheel)
    for py in (ROOT / 'pmal').glob('*.py'): assert files[f'pmal/{py.name}'] == py.read_bytes(), py.name
    for t in TEMPLATES: assert files[f'pmal/templates/{t}.ipynb'] == (ROOT / 'nbs' / 'experiments' / f'{t}.ipynb').read_bytes()
    entry = next(v for n, v in files.items() if n.endswith('.dist-info/entry_points.txt')).decode()
    assert 'pmal-reproduce = pmal.cli:main' in entry
    assert all(n.startswith('pmal/') or n.startswith('pmal-') and '.dist-info/' in n for n in files), sorted(files)


def test_sdist_holds_what_a_build_needs(checkout, wheel, tmp_path):
    "The sdist has setup.py, settings.ini, README.md, the modules and templates; a wheel built from it is the same."
    sdist = _run([sys.executable, '-c', 'import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))',
                  tmp_path / 'sdist'], cwd=checkout).stdout.split()[-1]
    files = _contents(tmp_path / 'sdist' / sdist)
    for need in ('setup.py', 'settings.ini', 'README.md', 'MANIFEST.in', *(f'pmal/templates/{t}.ipynb' for t in TEMPLATES)):
        assert need in files, f"the sdist lacks {need}"
    with tarfile.open(tmp_path / 'sdist' / sdist) as t: t.extractall(tmp_path / 'unpacked', filter='data')
    (unpacked,) = (tmp_path / 'unpacked').iterdir()
    _pip('wheel', '--no-build-isolation', '-w', tmp_path / 'from_sdist', unpacked)
    (again,) = (tmp_path / 'from_sdist').glob('pmal-*.whl')
    ours = {n: v for n, v in _contents(wheel).items() if n.startswith('pmal/')}
    assert {n: v for n, v in _contents(again).items() if n.startswith('pmal/')} == ours


def test_installed_wheel_runs_pmal_reproduce_outside_the_checkout(wheel, tmp_path, tiny):
    "Installed without dependencies into a target folder (the test environment supplies them), run from elsewhere."
    site = tmp_path / 'site'
    _pip('install', '--target', site, wheel)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    (elsewhere / 'tiny.yaml').write_text(Path(tiny).read_text())
    env = {k: v for k, v in os.environ.items() if k not in ('PMAL_TEMPLATES', 'PYTHONPATH')}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    where = _run([sys.executable, '-c', 'import pmal, pmal.driver as d; print(pmal.__file__); print(d.template_dir())'],
                 cwd=elsewhere, env=env).stdout.split()
    assert where == [str(site / 'pmal' / '__init__.py'), str(site / 'pmal' / 'templates')]
    r = _run([site / 'bin' / 'pmal-reproduce', 'run', '--out', 'store', '--set', 'dataset=digits', '--set', 'profile=tiny.yaml',
              '--set', 'T=3'], cwd=elsewhere, env=env, timeout=600)  # ~15 s on an idle 2-core machine
    assert ': done  [' in r.stdout.splitlines()[0], r.stdout[-2000:]
    (record,) = (elsewhere / 'store' / 'records').glob('*.json')
    record = json.loads(record.read_text())
    assert record['status'] == 'done' and record['settings']['dataset'] == 'digits' and 0 <= record['metrics']['dr_auroc'] <= 1
    (executed,) = (elsewhere / 'store' / 'notebooks').glob('*.ipynb')
    assert json.loads(executed.read_text())['metadata']['papermill']['input_path'] == str(site / 'pmal' / 'templates' / 'run.ipynb')


def test_a_digits_run_imports_only_what_it_uses(child_env):
    """Every papermill kernel, driver and spawned rank pays its imports: torchvision (a third of `import pmal.run`'s
    time) and scikit-learn's metrics are imported where they are used, so a digits run never imports torchvision and a
    process that only trains never imports scikit-learn."""
    code = ("import sys\nimport pmal.run, pmal.driver, pmal.distributed, pmal.figures, pmal.tables\n"
            "print('on import:', sorted(m for m in ('torchvision', 'sklearn') if m in sys.modules))\n"
            "from pmal.data import load_openset\nfrom pmal.models import create_model\nfrom pmal.run import _versions\n"
            "split = load_openset('digits'); create_model('digits_net', split.num_classes, 1); create_model('classifier32', 6, 3)\n"
            "print('digits run:', 'torchvision' in sys.modules, _versions()['torchvision'])")
    r = subprocess.run([sys.executable, '-c', code], env=child_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'on import: []' in r.stdout and 'digits run: False 0.' in r.stdout, r.stdout
