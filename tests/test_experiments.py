"""Package-level tests of pmal.experiments: settings and profiles, keys, the results store, and the three papermill
templates (run, tables, figures) executed on digits with a tiny profile, including a driver killed part-way."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
from unittest import mock

import numpy as np
import papermill
import pytest

import torch

import pmal.experiments
from pmal.baselines import REJECTION_RULE
from pmal.experiments import (RUN_PARAMETERS, PROFILES, ResultsStore, resolve_settings, run_key, work_key, run_recipe,
                              run_notebook, template_dir, template_parameters, write_json_atomic, grid, unique_runs,
                              write_figure, write_table, list_commands, load_profile, main, _request, execute_run,
                              run_spec, phase1_dir, load_run_split, table_rows, SPEC_VERSION, PRIMARY_RULE, RULE_WORDS)

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
    for c in grid(_request('fig6', ['digits'], profile=profile), out):
        auroc = 100 * store.load(c.key)['metrics'][f'{c.rule}_auroc']
        assert f"{c.row}: AUROC {auroc:.1f} under " in caption
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
    other = {m: 'mls' if REJECTION_RULE[m] == 'msp' else 'msp' for m in ('rpl', 'arpl')}
    assert {c.row for c in t1} == {'Softmax (MSP)', 'MLS', 'Softmax, equal budget', 'GCPL (CPN)', 'RPL', 'ARPL',
                                   f"RPL ({RULE_WORDS[other['rpl']]})", f"ARPL ({RULE_WORDS[other['arpl']]})",
                                   'PMAL (DR)', 'PMAL (PR)'}
    assert len(unique_runs(t1)) == 14
    rules = {(c.settings.method, c.rule) for c in t1}  # reference rules read as <method>_*, the other one by name
    assert {('gcpl', 'gcpl'), ('rpl', 'rpl'), ('arpl', 'arpl'), ('rpl', other['rpl']), ('arpl', other['arpl']),
            ('softmax_budget', 'msp')} <= rules
    t5 = grid(_request('table5', ['digits'], [0]))
    assert sorted({c.settings.T for c in t5}) == [1, 5, 10, 20, 30] and {c.settings.U for c in t5} == {2, 3, 4, 5, 6}
    t4 = grid(_request('table4', ['digits'], [0]))
    assert {c.settings.quality for c in t4} == {'robustness', 'max_probability', 'ensemble_variance', 'mc_dropout'}
    assert {c.settings.diversity for c in t4} == {'algorithm1', 'random', 'kmeans'}
    t3 = grid(_request('table3', ['digits'], [0]))
    assert [c.paper['auroc']['value'] for c in t3] == [80.3, 78.1, 81.6, 80.2, 81.9, 83.1]
    assert {c.settings.distance for c in t3 if c.settings} == {'nearest', 'point_to_set'}
    assert len(unique_runs(grid(_request('fig4b', ['digits'])))) == 3


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
    with mock.patch('pmal.experiments.train_baseline', wraps=pmal.experiments.train_baseline) as tb:
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
    assert budget['summary']['rule'] == PRIMARY_RULE['softmax_budget'] == 'msp'
    assert {'msp_auroc', 'mls_auroc', 'msp_oscr'} <= set(budget['metrics'])
    md, _ = write_table(store, _request('table1', ['digits'], [0], profile=budget['settings']['profile']))
    assert '| Softmax, equal budget | max probability | digits | 1/1 |' in md and 'equal budget: M1' in md


def test_figure_captions_state_what_the_figures_support(pmal_first, tiny3, capsys):
    out, _, _, _, _, _ = pmal_first
    for seed in (1, 2): _run(out, tiny3, method='pmal', seed=seed)
    store = ResultsStore(out)
    paths = write_figure(store, _request('fig4b', ['digits'], profile=tiny3))
    caption = Path([p for p in paths if p.suffix == '.txt'][0]).read_text()
    assert 'mean pairwise prototype overlap |A∩B|/T = ' in caption and 'chosen in all 3 repetitions' in caption
    assert any(v in caption for v in ('This supports', 'This only partly supports', 'This does not support'))
    caption = Path(write_figure(store, _request('fig3b', ['digits'], profile=tiny3))[-1]).read_text()
    assert "centred logits z·A of M1, the space where Algorithm 1 measures diversity" in caption
    old = pmal.experiments.load_figure_data  # figure data written before train_c existed: drawn, and said so
    with mock.patch('pmal.experiments.load_figure_data',
                    lambda *a: {k: v for k, v in old(*a).items() if k != 'train_c'}):
        caption = Path(write_figure(store, _request('fig3b', ['digits'], profile=tiny3))[-1]).read_text()
    assert 'embeddings z of M1, NOT the space where Algorithm 1 measures diversity' in caption


def test_image_size_downsamples_once_at_load_time(tmp_path):
    small = tmp_path / 'small.yaml'
    small.write_text("base: quick\nepochs: 1\ntsne_samples: 100\nimage_size: 4\n")
    s = resolve_settings(method='softmax', profile=str(small), out_dir=str(tmp_path), device='cpu')
    assert load_profile(small).image_shape((1, 8, 8)) == (1, 4, 4) == load_run_split(s).image_shape
    assert run_spec(s)['image_size'] == 4 and 'at 4 px' in pmal.experiments.describe(s)
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
    store, req = ResultsStore(tmp_path), _request('table1', ['digits'], [0])
    cells = grid(req, tmp_path)
    rpl = next(c for c in cells if c.settings.method == 'rpl')
    store.write(dict(key=rpl.key, status='done', spec={'dataset': 'digits'}, metrics={'mls_auroc': 0.5}))
    md, _ = write_table(store, req)
    assert "| RPL | " in md and 'has no rpl_* metrics (older code)' in md
    assert {r['status'] for r in table_rows(store, cells) if r['row'].startswith('RPL')} == {'failed'}


def test_repeated_splits_are_footnoted():
    md, _ = write_table(ResultsStore('/nonexistent-pmal-store'), _request('table1', ['svhn', 'cifar10', 'mnist']))
    for ds in ('svhn', 'cifar10'):
        assert f"{ds}: splits 0 and 1 of the standard split list hold the same known classes" in md
    assert 'mnist: splits' not in md and 'mean over 4 distinct splits' in md
    md, _ = write_table(ResultsStore('/nonexistent-pmal-store'), _request('table1', ['cifar10'], [1, 2]))
    assert 'splits 0 and 1' not in md


def test_the_notebooks_stand_alone():
    root = Path(__file__).resolve().parents[1]
    for nb in [root / 'nbs' / '30_experiments.ipynb', *(root / 'nbs' / 'experiments').glob('*.ipynb')]:
        assert 'PMAL_SPEC' not in nb.read_text(), nb
