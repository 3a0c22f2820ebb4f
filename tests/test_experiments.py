"""Package-level tests of pmal.experiments: settings and profiles, keys, the results store, and the three papermill
templates (run, tables, figures) executed on digits with a tiny profile, including a driver killed part-way."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
from unittest import mock

import numpy as np
import papermill
import pytest

from pmal.experiments import (RUN_PARAMETERS, PROFILES, ResultsStore, resolve_settings, run_key, work_key, run_recipe,
                              run_notebook, template_dir, template_parameters, write_json_atomic, grid, unique_runs,
                              write_figure, list_commands, load_profile, main, _request)

TINY = "base: quick\nepochs: 2\ntsne_samples: 200\n"
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
DRIVER = [sys.executable, '-c', 'import sys; from pmal.experiments import main; sys.exit(main())']


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    "A YAML profile: the quick profile with 2 epochs (a digits run trains in about a second)."
    path = tmp_path_factory.mktemp('profile') / 'tiny.yaml'
    path.write_text(TINY)
    return str(path)


# ---- settings, profiles, keys ---------------------------------------------------------------------------------

def test_template_parameters_are_the_run_settings():
    assert template_parameters(template_dir() / 'run.ipynb') == list(RUN_PARAMETERS)
    nb = json.loads((template_dir() / 'run.ipynb').read_text())
    assert sum('parameters' in c.get('metadata', {}).get('tags', []) for c in nb['cells']) == 1


def test_profiles_fill_what_a_run_leaves_unset(tiny):
    quick = resolve_settings(dataset='digits', profile='quick')
    assert (quick.backbone, quick.epochs, quick.T, quick.eps, quick.U) == ('digits_net', 30, 10, 0.7, 2)
    paper = resolve_settings(dataset='tinyimagenet', profile='paper')
    r = run_recipe(paper)
    assert (paper.backbone, r.epochs, r.lr_step, r.lr, r.batch_size, r.weight_decay) == ('classifier32', 600, 120, 0.01, 128, 5e-4)
    assert run_recipe(resolve_settings(dataset='imagenet100', profile='paper')).optimizer == 'sgd'
    s = resolve_settings(profile=tiny, T=3)
    assert (s.epochs, s.T, s.profile) == (2, 3, str(Path(tiny).resolve()))
    assert resolve_settings(method='gcpl').T is None


def test_keys_ignore_places_and_device_but_not_settings():
    a = resolve_settings(method='pmal')
    assert run_key(a) == run_key(resolve_settings(method='pmal', out_dir='/x', device='cpu', data_root='/d'))
    assert run_key(a) != run_key(resolve_settings(method='pmal', eps=0.5))
    assert run_key(a) != run_key(resolve_settings(method='pmal', split=1))
    assert work_key(resolve_settings(method='mls')) == run_key(resolve_settings(method='softmax'))


@pytest.mark.parametrize('params, message', [
    (dict(epoch=3), "unknown run parameter(s) ['epoch']"),
    (dict(method='svm'), 'method must be one of'),
    (dict(distance='cosine'), "distance='cosine'"),
    (dict(eps='high'), 'eps must be a number'),
    (dict(method='softmax', T=5), 'do not apply'),
    (dict(dataset='digits', split=9), 'split 9 not valid'),
    (dict(backbone='vgg'), "unknown backbone 'vgg'"),
    (dict(profile='fast'), "neither one of"),
    (dict(device='tpu:0'), "not a torch device"),
])
def test_bad_parameters_fail_before_training(tmp_path, params, message):
    with pytest.raises(ValueError, match=None) as e:
        run_notebook({**params, 'out_dir': str(tmp_path)})
    assert message in str(e.value)
    assert not (tmp_path / 'work').exists() and not (tmp_path / 'notebooks').exists()


def test_bad_yaml_profile_fails_before_training(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text("base: quick\npmal: {T: 0}\n")
    with pytest.raises(ValueError, match='T'):
        run_notebook({'profile': str(bad), 'out_dir': str(tmp_path)})
    bad.write_text("base: quick\nrecipe: {lr_rate: 0.1}\n")
    with pytest.raises(ValueError, match="unknown Recipe field"):
        load_profile(bad)
    assert not (tmp_path / 'work').exists()


def test_bad_value_in_the_template_fails_before_training(tmp_path):
    "Straight through papermill (no driver): the resolve cell raises before the training cell."
    t = time.time()
    with pytest.raises(papermill.PapermillExecutionError, match='method must be one of'):
        papermill.execute_notebook(str(template_dir() / 'run.ipynb'), str(tmp_path / 'out.ipynb'), kernel_name='python3',
                                   parameters=dict(method='svm', out_dir=str(tmp_path)), progress_bar=False)
    assert not (tmp_path / 'work').exists() and time.time() - t < 60


# ---- the results store ------------------------------------------------------------------------------------------

def test_store_writes_are_atomic(tmp_path):
    store = ResultsStore(tmp_path)
    store.write(dict(key='k', status='done', metrics={'dr_auroc': 0.9}))
    with mock.patch('os.replace', side_effect=OSError('killed')), pytest.raises(OSError):
        store.write(dict(key='k', status='done', metrics={'dr_auroc': 0.1}))
    assert store.load('k')['metrics']['dr_auroc'] == 0.9
    assert [p.name for p in (tmp_path / 'records').iterdir()] == ['k.json']
    write_json_atomic([1, 2], tmp_path / 'x.json')
    assert json.loads((tmp_path / 'x.json').read_text()) == [1, 2]
    assert store.status('missing') == 'missing'


# ---- the run template -------------------------------------------------------------------------------------------

def test_run_template_writes_a_record(tmp_path, tiny):
    "run.ipynb through papermill: a PMAL run writes its record, prototypes and figure data."
    papermill.execute_notebook(str(template_dir() / 'run.ipynb'), str(tmp_path / 'run.ipynb'), kernel_name='python3',
                               parameters=dict(profile=tiny, T=3, out_dir=str(tmp_path)), progress_bar=False)
    s = resolve_settings(profile=tiny, T=3, out_dir=str(tmp_path))
    store = ResultsStore(tmp_path)
    record = store.load(run_key(s))
    assert record['status'] == 'done' and record['settings']['T'] == 3
    for rule in ('msp', 'mls', 'dr'):
        for m in ('acc', 'auroc', 'oscr'): assert 0 <= record['metrics'][f'{rule}_{m}'] <= 1
    assert record['summary']['rule'] == 'dr' and record['timings']['total_s'] > 0
    assert {'torch', 'pmal', 'sklearn'} <= set(record['versions']) and record['hardware']['device'] == 'cpu'
    with np.load(tmp_path / record['artifacts']['prototypes']) as f: assert f['indices'].shape == (6, 3)
    with np.load(tmp_path / record['artifacts']['figure_data']) as f:
        assert f['proto_z'].shape[:2] == (6, 3) and (f['test_label'] == -1).any() and len(f['r']) == record['data']['n_train']
    assert (store.work_dir(run_key(s)) / 'phase2.pt').exists()


def test_a_failing_run_leaves_an_error_record(tmp_path):
    bad = tmp_path / 'half.npz'  # x_train only: resolves (image size), fails when loading
    np.savez(bad, x_train=np.zeros((4, 8, 8), np.uint8))
    status, record = run_notebook({'dataset': f'npz:{bad}', 'known_classes': [0, 1], 'out_dir': str(tmp_path / 'store')})
    assert status == 'error' and record['status'] == 'error'
    assert 'lacks arrays' in record['error'] and 'npz:' in record['name']
    assert ResultsStore(tmp_path / 'store').load(record['key'])['status'] == 'error'


# ---- the driver: kill part-way, rerun, tables and figures ---------------------------------------------------------

@pytest.fixture(scope='module')
def killed_and_rerun(tmp_path_factory, tiny):
    "Table 1 on digits split 0 (6 runs): kill the driver after the first finished run, then rerun it to the end."
    out = tmp_path_factory.mktemp('store')
    args = DRIVER + ['--table', '1', '--figure', '4a', '6', '--dataset', 'digits', '--splits', '0', '--profile', tiny,
                     '--out', str(out), '--device', 'cpu']
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    records, deadline = out / 'records', time.time() + 120
    while time.time() < deadline and not (records.exists() and any(records.glob('*.json'))):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the kernel it started, mid-way through the second run
    proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in records.glob('*.json')}
    rerun = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    return out, first, rerun


def test_rerun_after_kill_completes_without_recomputing(killed_and_rerun):
    out, first, rerun = killed_and_rerun
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert 1 <= len(first) < 6
    done = {p.name: p.stat().st_mtime_ns for p in (out / 'records').glob('*.json')}
    assert len(done) == 6 and all(json.loads((out / 'records' / n).read_text())['status'] == 'done' for n in done)
    assert all(done[n] == t for n, t in first.items())  # finished runs were skipped, not recomputed
    assert rerun.stdout.count('skipped') == len(first) and '[6/6]' in rerun.stdout and 'ETA' in rerun.stdout


def test_tables_template_shows_ours_paper_and_difference(killed_and_rerun):
    out, _, rerun = killed_and_rerun
    md = (out / 'tables' / 'table1_digits_tiny.md').read_text()
    assert '| PMAL (DR) | digits | 1/1 |' in md and '99.5' in md  # the paper's MNIST AUROC of PMAL-OSCRI
    rows = (out / 'tables' / 'table1_digits_tiny.csv').read_text().splitlines()
    assert rows[0].startswith('row,dataset,runs,status') and len(rows) == 8
    assert (out / 'notebooks' / 'tables.ipynb').exists() and str(out / 'tables' / 'table1_digits_tiny.md') in rerun.stdout


def test_figures_template_writes_png_and_pdf(killed_and_rerun, capsys):
    out, _, _ = killed_and_rerun
    for fig in ('fig4a', 'fig6'):
        for ext in ('png', 'pdf'): assert (out / 'figures' / f'{fig}_digits_tiny.{ext}').stat().st_size > 1000
    assert write_figure(ResultsStore(out), _request('fig5a', ['digits'], profile=load_profile_path(out))) == []
    assert 'fig5a (digits) skipped: 1 of 2 runs' in capsys.readouterr().out


def load_profile_path(out):
    return json.loads((out / 'requests.json').read_text())[0]['profile']


def test_list_prints_one_self_contained_command_per_missing_run(killed_and_rerun, tmp_path, capsys):
    out, _, _ = killed_and_rerun
    profile = load_profile_path(out)
    assert main(['--table', '1', '--dataset', 'digits', '--splits', '0', '--profile', profile, '--out', str(out), '--list']) == 0
    assert capsys.readouterr().out.strip() == ''  # everything is done
    fresh = tmp_path / 'fresh'
    assert main(['--figure', '5a', '--dataset', 'digits', '--profile', profile, '--out', str(fresh), '--list']) == 0
    cmds = capsys.readouterr().out.strip().splitlines()
    assert len(cmds) == 2 and all(c.startswith('pmal-reproduce run --out ') for c in cmds)
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(cmds[0], shell=True, env={**ENV, 'PATH': f"{bin_dir}:{ENV['PATH']}"}, cwd='/',
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(list((fresh / 'records').glob('*.json'))) == 1


def test_grids_cover_the_papers_tables():
    t1 = grid(_request('table1', ['digits'], [0, 1]))
    assert {c.row for c in t1} == {'Softmax (MSP)', 'MLS', 'GCPL (CPN)', 'RPL', 'ARPL', 'PMAL (DR)', 'PMAL (PR)'}
    assert len(unique_runs(t1)) == 12
    t5 = grid(_request('table5', ['digits'], [0]))
    assert sorted({c.settings.T for c in t5}) == [1, 5, 10, 20, 30] and {c.settings.U for c in t5} == {2, 3, 4, 5, 6}
    t4 = grid(_request('table4', ['digits'], [0]))
    assert {c.settings.quality for c in t4} == {'robustness', 'max_probability', 'ensemble_variance', 'mc_dropout'}
    assert {c.settings.diversity for c in t4} == {'algorithm1', 'random', 'kmeans'}
    t3 = grid(_request('table3', ['digits'], [0]))
    assert [c.paper['auroc']['value'] for c in t3] == [80.3, 78.1, 81.6, 80.2, 81.9, 83.1]
    assert {c.settings.distance for c in t3 if c.settings} == {'nearest', 'point_to_set'}
    assert len(unique_runs(grid(_request('fig4b', ['digits'])))) == 3
