"""Package-level tests of the reproduction layer (pmal.settings, store, run, targets, tables, figures, driver): settings and profiles, keys, the results store, and the three papermill
templates (run, tables, figures) executed on digits with a tiny profile, including a driver killed part-way."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
from unittest import mock

import numpy as np
import papermill
import pytest

import torch

import pmal.driver, pmal.run, pmal.figures
from pmal.cli import RUN_PARAMETERS, main
from pmal.files import write_json_atomic
from pmal.methods import RULE_WORDS, get_method
from pmal.settings import (SPEC_VERSION, resolve_settings, run_key, work_key, run_recipe, run_spec, load_profile,
                           describe)
from pmal.store import ResultsStore
from pmal.run import execute_run, phase1_dir, load_run_split
from pmal.targets import make_request, grid, unique_runs
from pmal.tables import write_table, table_rows
from pmal.figures import write_figure
from pmal.mining import Prototypes
from pmal.driver import run_notebook, template_dir, template_parameters

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
    mined = Prototypes.load(tmp_path / record['artifacts']['prototypes'])
    assert record['mining'] == mined.shortfall() and len(record['mining']['candidates_per_class']) == 6
    with np.load(tmp_path / record['artifacts']['figure_data']) as f:
        assert f['proto_z'].shape[:2] == (6, 3) and (f['test_label'] == -1).any() and len(f['r']) == record['data']['n_train']
    assert (store.work_dir(run_key(s)) / 'phase2.pt').exists()


def test_a_failing_run_leaves_an_error_record(tmp_path, monkeypatch):
    bad = tmp_path / 'half.npz'  # x_train only: refused when the settings are resolved, before any kernel starts
    np.savez(bad, x_train=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match='lacks arrays'):
        run_notebook({'dataset': f'npz:{bad}', 'known_classes': [0, 1], 'out_dir': str(tmp_path / 'store')})
    assert not (tmp_path / 'store').exists()
    def kernel_fails(*a, **k):  # a run that raises in its kernel
        raise papermill.PapermillExecutionError(0, 1, 'RuntimeError: the disk is full', 'RuntimeError', 'the disk is full', [])
    monkeypatch.setattr(pmal.driver, '_papermill', kernel_fails)
    status, record = run_notebook({'method': 'softmax', 'out_dir': str(tmp_path / 'store')})
    assert status == 'error' and record['status'] == 'error'
    assert record['error'] == 'RuntimeError: the disk is full' and 'softmax' in record['name']
    assert ResultsStore(tmp_path / 'store').load(record['key'])['status'] == 'error'


# ---- the driver: kill part-way, rerun, tables and figures ---------------------------------------------------------

@pytest.fixture(scope='module')
def killed_and_rerun(tmp_path_factory, tiny, driver, child_env):
    "Table 1 on digits split 0 (6 runs): kill the driver after the first finished run, then rerun it to the end."
    out = tmp_path_factory.mktemp('store')
    args = driver + ['--table', '1', '--figure', '4a', '6', '--dataset', 'digits', '--splits', '0', '--profile', tiny,
                     '--out', str(out), '--device', 'cpu']
    proc = subprocess.Popen(args, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    records, deadline = out / 'records', time.time() + 120
    while time.time() < deadline and not (records.exists() and any(records.glob('*.json'))):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the kernel it started, mid-way through the second run
    proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in records.glob('*.json')}
    rerun = subprocess.run(args, env=child_env, capture_output=True, text=True, timeout=300)
    return out, first, rerun


def test_rerun_after_kill_completes_without_recomputing(killed_and_rerun):
    out, first, rerun = killed_and_rerun
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert 1 <= len(first) < 7
    done = {p.name: p.stat().st_mtime_ns for p in (out / 'records').glob('*.json')}
    assert len(done) == 7 and all(json.loads((out / 'records' / n).read_text())['status'] == 'done' for n in done)
    assert all(done[n] == t for n, t in first.items())  # finished runs were skipped, not recomputed
    assert rerun.stdout.count('skipped') == len(first) and '[7/7]' in rerun.stdout and 'ETA' in rerun.stdout


def test_tables_template_shows_ours_paper_and_difference(killed_and_rerun):
    out, _, rerun = killed_and_rerun
    md = (out / 'tables' / 'table1_digits_tiny.md').read_text()
    assert '| PMAL (DR) | DR: min point-to-set distance | digits | 1/1 |' in md
    assert '| 99.5 (mnist) |' in md  # the paper's MNIST AUROC of PMAL-OSCRI, for reference: digits is not MNIST
    rows = (out / 'tables' / 'table1_digits_tiny.csv').read_text().splitlines()
    assert rows[0].startswith('row,rule,dataset,runs,status') and len(rows) == 11
    import csv
    table = list(csv.DictReader(rows))
    assert all(r['acc_diff'] == r['auroc_diff'] == '' for r in table)  # no Δ against another data set
    assert {r['row'] for r in table} >= {'Softmax, equal budget', 'RPL (max logit)'} and all(r['status'] == 'done' for r in table)
    assert (out / 'notebooks' / 'tables.ipynb').exists() and str(out / 'tables' / 'table1_digits_tiny.md') in rerun.stdout


def test_figures_template_writes_png_and_pdf(killed_and_rerun, capsys):
    out, _, _ = killed_and_rerun
    for fig in ('fig4a', 'fig6'):
        for ext in ('png', 'pdf'): assert (out / 'figures' / f'{fig}_digits_tiny.{ext}').stat().st_size > 1000
    caption = (out / 'figures' / 'fig6_digits_tiny.txt').read_text()  # each panel's AUROC under its primary rule
    store, profile = ResultsStore(out), load_profile_path(out)
    for c in grid(make_request('fig6', ['digits'], profile=profile), out):
        auroc = 100 * store.load(c.key)['metrics'][f'{c.rule}_auroc']
        assert f"{c.row}: AUROC {auroc:.1f} under " in caption
    assert write_figure(ResultsStore(out), make_request('fig5a', ['digits'], profile=load_profile_path(out))) == []
    assert 'fig5a (digits) skipped: 1 of 2 runs' in capsys.readouterr().out


def load_profile_path(out):
    return json.loads((out / 'requests.json').read_text())[0]['profile']


def test_list_prints_one_self_contained_command_per_missing_run(killed_and_rerun, tmp_path, capsys, child_env):
    out, _, _ = killed_and_rerun
    profile = load_profile_path(out)
    assert main(['--table', '1', '--dataset', 'digits', '--splits', '0', '--profile', profile, '--out', str(out), '--list']) == 0
    assert capsys.readouterr().out.strip() == ''  # everything is done
    fresh = tmp_path / 'fresh'
    assert main(['--figure', '5a', '--dataset', 'digits', '--profile', profile, '--out', str(fresh), '--list']) == 0
    cmds = capsys.readouterr().out.strip().splitlines()
    assert len(cmds) == 2 and all(c.startswith('pmal-reproduce run --out ') for c in cmds)
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(cmds[0], shell=True, env={**child_env, 'PATH': f"{bin_dir}:{child_env['PATH']}"}, cwd='/',
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(list((fresh / 'records').glob('*.json'))) == 1


def test_grids_cover_the_papers_tables():
    t1 = grid(make_request('table1', ['digits'], [0, 1]))
    other = {m: 'mls' if get_method(m).rule == 'msp' else 'msp' for m in ('rpl', 'arpl')}
    assert {c.row for c in t1} == {'Softmax (MSP)', 'MLS', 'Softmax, equal budget', 'GCPL (CPN)', 'RPL', 'ARPL',
                                   f"RPL ({RULE_WORDS[other['rpl']]})", f"ARPL ({RULE_WORDS[other['arpl']]})",
                                   'PMAL (DR)', 'PMAL (PR)'}
    assert len(unique_runs(t1)) == 14
    rules = {(c.settings.method, c.rule) for c in t1}  # reference rules read as <method>_*, the other one by name
    assert {('gcpl', 'gcpl'), ('rpl', 'rpl'), ('arpl', 'arpl'), ('rpl', other['rpl']), ('arpl', other['arpl']),
            ('softmax_budget', 'msp')} <= rules
    t5 = grid(make_request('table5', ['digits'], [0]))
    assert sorted({c.settings.T for c in t5}) == [1, 5, 10, 20, 30] and {c.settings.U for c in t5} == {2, 3, 4, 5, 6}
    t4 = grid(make_request('table4', ['digits'], [0]))
    assert {c.settings.quality for c in t4} == {'robustness', 'max_probability', 'ensemble_variance', 'mc_dropout'}
    assert {c.settings.diversity for c in t4} == {'algorithm1', 'random', 'kmeans'}
    t3 = grid(make_request('table3', ['digits'], [0]))
    assert [c.paper['auroc']['value'] for c in t3] == [80.3, 78.1, 81.6, 80.2, 81.9, 83.1]
    assert {c.settings.distance for c in t3 if c.settings} == {'nearest', 'point_to_set'}
    assert len(unique_runs(grid(make_request('fig4b', ['digits'])))) == 3


# ---- faithfulness: versioned keys, image size, M1 shared with the softmax baseline, equal budget, honest reports ----

TINY3 = "base: quick\nepochs: 2\ntsne_samples: 200\npmal: {T: 3}\n"


@pytest.fixture(scope='module')
def tiny3(tmp_path_factory):
    path = tmp_path_factory.mktemp('profile3') / 'tiny3.yaml'
    path.write_text(TINY3)
    return str(path)


def _run(out, profile, **kw):
    return execute_run(resolve_settings(profile=profile, out_dir=str(out), device='cpu', **kw))


def _ckpt(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def pmal_first(tmp_path_factory, tiny3):
    "A store where PMAL (seed 0) runs first, then the softmax baseline, MLS and softmax_budget (train_baseline watched)."
    out = tmp_path_factory.mktemp('pmal_first')
    first = _run(out, tiny3, method='pmal')
    m1 = phase1_dir(resolve_settings(profile=tiny3, out_dir=str(out)), ResultsStore(out)) / 'phase1_model0.pt'
    before = m1.stat()
    with mock.patch('pmal.run.train_baseline', wraps=pmal.run.train_baseline) as tb:
        records = {m: _run(out, tiny3, method=m) for m in ('softmax', 'mls', 'softmax_budget')}
    return out, first, records, m1, before, tb.call_args_list


def test_every_key_carries_the_spec_version():
    spec = run_spec(resolve_settings(method='softmax'))
    assert spec['pmal_version'] == SPEC_VERSION >= 2 and 'image_size' not in spec


def test_softmax_baseline_reuses_m1_of_a_pmal_run(pmal_first):
    out, pmal_record, records, m1, before, _ = pmal_first
    store = ResultsStore(out)
    softmax = store.work_dir(records['softmax']['key']) / 'model.pt'
    phase1 = store.work_dir(pmal_record['key']) / 'phase1_model0.pt'
    assert softmax.stat().st_ino == m1.stat().st_ino == phase1.stat().st_ino  # one file: trained once
    assert m1.stat().st_mtime_ns == before.st_mtime_ns  # and not trained again
    assert records['softmax']['reused'].startswith('M1 reused (checkpoint linked from shared/phase1/')
    assert pmal_record['reused'] is None  # PMAL ran first: it trained M1
    assert records['mls']['reused'].startswith('M1 reused') and records['mls']['metrics']['msp_auroc'] == \
        records['softmax']['metrics']['msp_auroc']


def test_m1_shared_either_way_gives_the_results_of_separate_trainings(pmal_first, tmp_path, tiny3):
    "Softmax trained alone equals the one linked from PMAL's M1; PMAL after it links its M1 and equals PMAL run first."
    out, pmal_record, records, _, _, _ = pmal_first
    alone = _run(tmp_path, tiny3, method='softmax')
    assert alone['reused'] is None
    assert alone['metrics'] == pytest.approx(records['softmax']['metrics'], abs=1e-12)
    after = _run(tmp_path, tiny3, method='pmal')
    store = ResultsStore(tmp_path)
    assert after['reused'].startswith('phase-1 model(s) [0] linked from shared/phase1/')
    assert (store.work_dir(after['key']) / 'phase1_model0.pt').stat().st_ino == \
        (store.work_dir(alone['key']) / 'model.pt').stat().st_ino
    assert after['metrics'] == pytest.approx(pmal_record['metrics'], abs=1e-12)


def test_softmax_budget_fine_tunes_m1_for_phase_2s_epochs(pmal_first):
    out, pmal_record, records, m1, before, calls = pmal_first
    store, budget = ResultsStore(out), records['softmax_budget']
    inits = [c.kwargs['init'] for c in calls if c.kwargs.get('init') is not None]
    assert len(inits) == 1 and len(calls) == 4  # softmax, mls, the M1 of softmax_budget (no training), its fine-tuning
    m1_state = _ckpt(m1)['model']
    assert all(torch.equal(inits[0][k].cpu(), v) for k, v in m1_state.items())  # starts from PMAL's M1
    assert m1.stat().st_mtime_ns == before.st_mtime_ns
    tuned = _ckpt(store.work_dir(budget['key']) / 'model.pt')
    phase2 = _ckpt(store.work_dir(pmal_record['key']) / 'phase2.pt')
    assert len(tuned['history']) == len(phase2['history']) == budget['settings']['epochs']  # PMAL's phase-2 budget
    assert tuned['recipe'] == phase2['recipe']                                              # and its recipe
    assert not all(torch.equal(tuned['model'][k], v) for k, v in m1_state.items())          # it trained
    assert budget['summary']['rule'] == get_method('softmax_budget').headline == 'msp'
    assert {'msp_auroc', 'mls_auroc', 'msp_oscr'} <= set(budget['metrics'])
    md, _ = write_table(store, make_request('table1', ['digits'], [0], profile=budget['settings']['profile']))
    assert '| Softmax, equal budget | max probability | digits | 1/1 |' in md and 'equal budget: M1' in md


def test_figure_captions_state_what_the_figures_support(pmal_first, tiny3, capsys):
    out, _, _, _, _, _ = pmal_first
    for seed in (1, 2): _run(out, tiny3, method='pmal', seed=seed)
    store = ResultsStore(out)
    paths = write_figure(store, make_request('fig4b', ['digits'], profile=tiny3))
    caption = Path([p for p in paths if p.suffix == '.txt'][0]).read_text()
    assert 'mean pairwise prototype overlap |A∩B|/T = ' in caption and 'chosen in all 3 repetitions' in caption
    assert any(v in caption for v in ('This supports', 'This only partly supports', 'This does not support'))
    caption = Path(write_figure(store, make_request('fig3b', ['digits'], profile=tiny3))[-1]).read_text()
    assert "centred logits z·A of M1, the space where Algorithm 1 measures diversity" in caption
    old = pmal.figures.load_figure_data  # figure data written before train_c existed: drawn, and said so
    with mock.patch('pmal.figures.load_figure_data',
                    lambda *a: {k: v for k, v in old(*a).items() if k != 'train_c'}):
        caption = Path(write_figure(store, make_request('fig3b', ['digits'], profile=tiny3))[-1]).read_text()
    assert 'embeddings z of M1, NOT the space where Algorithm 1 measures diversity' in caption


def test_image_size_downsamples_once_at_load_time(tmp_path):
    small = tmp_path / 'small.yaml'
    small.write_text("base: quick\nepochs: 1\ntsne_samples: 100\nimage_size: 4\n")
    s = resolve_settings(method='softmax', profile=str(small), out_dir=str(tmp_path), device='cpu')
    assert load_profile(small).image_shape((1, 8, 8)) == (1, 4, 4) == load_run_split(s).image_shape
    assert run_spec(s)['image_size'] == 4 and 'at 4 px' in describe(s)
    assert execute_run(s)['data']['image_shape'] == [1, 4, 4]
    noop = tmp_path / 'noop.yaml'
    noop.write_text("base: quick\nepochs: 1\ntsne_samples: 100\nimage_size: 8\n")  # digits are 8x8 already
    plain = tmp_path / 'plain.yaml'
    plain.write_text("base: quick\nepochs: 1\ntsne_samples: 100\n")
    assert run_key(resolve_settings(method='softmax', profile=str(noop))) == \
        run_key(resolve_settings(method='softmax', profile=str(plain)))
    big = resolve_settings(dataset='tinyimagenet', profile=str(small))
    assert big.backbone == 'digits_net' and big.epochs == 1  # the size rule sees 4x4, not 64x64
    with pytest.raises(ValueError, match='needs images in memory'):
        resolve_settings(dataset='imagenet100', profile=str(small))


def test_an_old_record_does_not_crash_the_tables(tmp_path):
    "A record of older code (no spec version, no metrics for a rule a row reads) is shown as failed, not a crash."
    store, req = ResultsStore(tmp_path), make_request('table1', ['digits'], [0])
    cells = grid(req, tmp_path)
    rpl = next(c for c in cells if c.settings.method == 'rpl')
    store.write(dict(key=rpl.key, status='done', spec={'dataset': 'digits'}, metrics={'mls_auroc': 0.5}))
    md, _ = write_table(store, req)
    assert "| RPL | " in md and 'has no rpl_* metrics (older code)' in md
    assert {r['status'] for r in table_rows(store, cells) if r['row'].startswith('RPL')} == {'failed'}


def test_repeated_splits_are_footnoted():
    md, _ = write_table(ResultsStore('/nonexistent-pmal-store'), make_request('table1', ['svhn', 'cifar10', 'mnist']))
    for ds in ('svhn', 'cifar10'):
        assert f"{ds}: splits 0 and 1 of the standard split list hold the same known classes" in md
    assert 'mnist: splits' not in md and 'mean over 4 distinct splits' in md
    md, _ = write_table(ResultsStore('/nonexistent-pmal-store'), make_request('table1', ['cifar10'], [1, 2]))
    assert 'splits 0 and 1' not in md


def test_the_notebooks_stand_alone():
    root = Path(__file__).resolve().parents[1]
    for nb in [*(root / 'nbs').glob('3*.ipynb'), *(root / 'nbs' / 'experiments').glob('*.ipynb')]:
        assert 'PMAL_SPEC' not in nb.read_text(), nb


# ---- issue 12: bad input fails first and clearly ---------------------------------------------------------------

@pytest.mark.parametrize('params, message', [
    (dict(eps=2), 'eps must be in [0, 1]'), (dict(eps=-1), 'eps must be in [0, 1]'), (dict(delta=-3), 'delta must be >= 0'),
    (dict(lambda_p=-1), 'lambda_p must be >= 0'), (dict(eps=float('nan')), 'eps must be a finite number'),
    (dict(seed=-1), 'seed must be an integer >= 0'), (dict(split=-1), 'split -1 not valid'),
])
def test_out_of_range_settings_fail_when_resolved(params, message):
    with pytest.raises(ValueError) as e:
        resolve_settings(**params)
    assert message in str(e.value)


@pytest.mark.parametrize('text, message', [
    ("pmal: {delta: -3}\n", 'delta must be >= 0'), ("pmal: {eps: 1.5}\n", 'eps must be in [0, 1]'),
    ("recipe: {weight_decay: -0.1}\n", 'weight_decay must be >= 0'), ("recipe: {beta1: 1.5}\n", 'beta1 must be in [0, 1)'),
    ("recipe: {lr: .nan}\n", 'lr must be a finite number'), ("lr_step_fraction: 0\n", 'lr_step_fraction must be in (0, 1]'),
    ("tsne_samples: 0\n", 'tsne_samples must be an integer >= 1'), ("seed: -2\n", 'seed must be an integer >= 0'),
    ("epochs: 0\n", 'epochs must be'), ("epochs: 2.5\n", 'epochs must be an integer'),
    ("sizes: [[8, digits_net, 0]]\n", 'epochs must be'),
])
def test_out_of_range_profile_values_fail_when_the_profile_is_read(tmp_path, text, message):
    p = tmp_path / 'bad.yaml'
    p.write_text('base: quick\n' + text)
    with pytest.raises(ValueError) as e:
        resolve_settings(profile=str(p))
    assert message in str(e.value) and str(p) in str(e.value)


def test_an_out_of_range_set_fails_before_training(tmp_path, capsys):
    "`pmal-reproduce run --set eps=2 --set epochs=1` trained both phase-1 models before it failed."
    assert main(['run', '--out', str(tmp_path), '--set', 'eps=2', '--set', 'epochs=1']) == 2
    assert 'eps must be in [0, 1]' in capsys.readouterr().err
    assert not (tmp_path / 'work').exists() and not (tmp_path / 'notebooks').exists()


BAD_NPZ = {  # arrays changed from a good file, what the message says
    'images N x 3': (dict(x_train=np.zeros((12, 3), np.uint8), x_test=np.zeros((8, 3), np.uint8)), 'N x H x W'),
    'images N x 3 x 1': (dict(x_train=np.zeros((12, 3, 1), np.uint8), x_test=np.zeros((8, 3, 1), np.uint8)), 'too small'),
    'string labels': (dict(y_train=np.repeat(list('abcd'), 3)), 'y_train must hold integer class ids'),
    'a single known class': (dict(known=np.array([2])), 'at least 2 known classes'),
    'no unknown test image': (dict(known=np.arange(4)), 'no unknown test image'),
    'a known class without training image': (dict(y_train=np.repeat([0, 1, 2, 2], 3), known=np.array([0, 3])),
                                             'known class(es) [3] have no training image'),
}


def _npz_file(path, **change):
    y_tr, y_te = np.repeat(np.arange(4), 3), np.repeat(np.arange(4), 2)
    arrays = dict(x_train=np.full((12, 8, 8), 7, np.uint8), y_train=y_tr, x_test=np.full((8, 8, 8), 9, np.uint8), y_test=y_te,
                  known=np.array([0, 1]))
    np.savez(path, **{**arrays, **change})
    return path


@pytest.mark.parametrize('case', list(BAD_NPZ))
def test_a_bad_npz_fails_when_the_settings_are_resolved(tmp_path, case):
    change, message = BAD_NPZ[case]
    path = _npz_file(tmp_path / 'bad.npz', **change)
    with pytest.raises(ValueError) as e:
        resolve_settings(dataset=f'npz:{path}', out_dir=str(tmp_path))
    assert message in str(e.value) and str(path) in str(e.value)


def test_an_unknown_template_parameter_fails_the_run(tmp_path):
    "papermill run.ipynb out.ipynb -p bogus 1 warned, trained and exited 0."
    with pytest.raises(papermill.PapermillExecutionError) as e:
        papermill.execute_notebook(str(template_dir() / 'run.ipynb'), str(tmp_path / 'out.ipynb'), kernel_name='python3',
                                   parameters=dict(bogus=1, epochs=1, out_dir=str(tmp_path)), progress_bar=False)
    assert "unknown parameter(s) ['bogus']" in str(e.value) and 'lambda_p' in str(e.value)
    assert not (tmp_path / 'work').exists()


def test_missing_data_is_found_once_before_the_grid_starts(tmp_path, tiny, capsys):
    empty = tmp_path / 'data'
    empty.mkdir()
    t = time.time()
    assert main(['--figure', '4a', '--dataset', 'mnist', 'svhn', '--data-root', str(empty), '--profile', tiny,
                 '--out', str(tmp_path / 'store'), '--device', 'cpu']) == 2
    err = capsys.readouterr().err
    assert 'mnist: data not found' in err and 'svhn: data not found' in err and '--download' in err
    assert not (tmp_path / 'store' / 'notebooks').exists() and time.time() - t < 60


def test_download_fetches_what_is_missing_before_the_grid(tmp_path, tiny, capsys, monkeypatch):
    import pmal.data
    calls = []
    monkeypatch.setattr(pmal.data, 'download_data', lambda name, root=None: calls.append((name, str(root))))
    assert main(['--figure', '4a', '--dataset', 'mnist', '--data-root', str(tmp_path), '--profile', tiny,
                 '--out', str(tmp_path / 'store'), '--download']) == 2  # the stand-in downloaded nothing
    assert calls == [('mnist', str(tmp_path))] and 'mnist: data not found' in capsys.readouterr().err


def test_list_shows_only_the_splits_that_exist(tmp_path, tiny, capsys):
    one = _npz_file(tmp_path / 'one.npz')  # one row of `known`: one split
    assert main(['--table', '1', '--dataset', f'npz:{one}', '--profile', tiny, '--out', str(tmp_path / 's'), '--list']) == 0
    cmds = capsys.readouterr().out.strip().splitlines()
    assert len(cmds) == 7 and all("--set split=0" in c for c in cmds)
    assert main(['--table', '1', '--dataset', f'npz:{one}', '--splits', '3', '--profile', tiny, '--out', str(tmp_path / 's'),
                 '--list']) == 2
    assert 'split 3 not in 0..0' in capsys.readouterr().err
    assert {c.settings.split for c in grid(make_request('table2', ['imagenet100']))} == {0}  # ImageNet-100 has one split


# ---- issue 12: usability on the way ---------------------------------------------------------------------------------

def test_help_is_quick_and_lists_the_names(child_env):
    code = ("import sys, time; t = time.time()\nfrom pmal.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
            "print('torch imported:', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, '-c', code], env=child_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'torch imported: False' in r.stdout
    for name in ('eps', 'lambda_p', 'known_classes', 'tsne_samples', 'lr_step_fraction', 'image_size', '--download'):
        assert name in r.stdout, name
    assert "default base is 'paper' (600 epochs)" in r.stdout
    ini = (Path(__file__).resolve().parents[1] / 'settings.ini').read_text()
    assert 'pmal-reproduce=pmal.cli:main' in ini


def test_run_shows_progress_and_ends_with_the_metrics(tmp_path, tiny, capsys, monkeypatch):
    monkeypatch.setenv('PMAL_PROGRESS', '1')  # the bar is drawn on a terminal; forced here
    assert main(['run', '--out', str(tmp_path), '--set', f'profile={tiny}', '--set', 'method=softmax',
                 '--set', 'device=cpu']) == 0
    out, err = capsys.readouterr()
    assert 'auroc' in out and 'msp' in out and 'done:' in out      # the run's metrics, then where the record is
    assert 'train' in err and 'epoch' in err and '2/2' in err        # stage, epochs, ETA (tqdm)


def test_the_kernel_logs_no_interrupt_at_shutdown(tmp_path, monkeypatch):
    "jupyter_client interrupts every kernel it shuts down; ipykernel logs that at ERROR level, so ERROR is not shown."
    seen = {}
    monkeypatch.setattr(papermill, 'execute_notebook', lambda *a, **k: seen.update(k))
    pmal.driver._papermill(template_dir() / 'tables.ipynb', tmp_path / 'x.ipynb', {}, tmp_path)
    assert '--IPKernelApp.log_level=CRITICAL' in seen['extra_arguments']
