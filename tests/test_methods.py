"""The method registry (pmal.methods): one place that says how a method trains and is scored, read by the baselines,
the pipeline, the run settings, one run, the tables and `pmal-reproduce`. A method registered once, by a plugin module
named in $PMAL_PLUGINS, runs through `pmal-reproduce run` (whose runs execute in fresh papermill kernels)."""
import json, os, subprocess, sys, textwrap

import pytest

from pmal.methods import METHODS, Method, get_method, method_names, register_method, create_criterion, load_plugins
from pmal.targets import rule_name

PLUGIN = textwrap.dedent('''
    "A toy method for the registry test: cross-entropy with label smoothing, scored by its max logit."
    import torch.nn.functional as F
    from torch import nn
    from pmal.methods import Method, register_method

    class SmoothCriterion(nn.Module):
        def __init__(self, smoothing=0.1):
            super().__init__(); self.smoothing = smoothing
        def forward(self, model, x, y):
            _, logits = model(x)
            return F.cross_entropy(logits.float(), y, label_smoothing=self.smoothing), logits

    def smooth_criterion(num_classes, embed_dim, **kw): return SmoothCriterion(**kw)

    register_method(Method('smooth', 'toy_methods:smooth_criterion', rule='mls', description='label-smoothed softmax'))
''')


@pytest.fixture
def plugin(tmp_path):
    (tmp_path / 'toy_methods.py').write_text(PLUGIN)
    env = {**os.environ, 'PMAL_PLUGINS': 'toy_methods', 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1',
           'PYTHONPATH': os.pathsep.join(filter(None, [str(tmp_path), os.environ.get('PYTHONPATH')]))}
    yield tmp_path, env
    METHODS.pop('smooth', None)
    sys.modules.pop('toy_methods', None)


def test_every_builtin_method_is_described_once():
    assert method_names()[:7] == ('pmal', 'softmax', 'mls', 'softmax_budget', 'gcpl', 'rpl', 'arpl')
    assert {m: get_method(m).headline for m in ('pmal', 'softmax', 'mls', 'softmax_budget', 'gcpl', 'rpl', 'arpl')} == \
        dict(pmal='dr', softmax='msp', mls='mls', softmax_budget='msp', gcpl='gcpl', rpl='rpl', arpl='arpl')
    # GCPL's rule has one name wherever it is read: its reference rule 'msp', read through its own scores
    assert rule_name('gcpl', 'gcpl') == rule_name('gcpl', get_method('gcpl').rule) == 'max probability of its own scores (reference rule)'


def test_a_plugin_module_registers_its_methods_when_loaded(plugin, monkeypatch):
    folder, env = plugin
    monkeypatch.setenv('PMAL_PLUGINS', 'toy_methods')
    monkeypatch.syspath_prepend(str(folder))
    load_plugins()
    assert get_method('smooth').rule == 'mls'
    assert type(create_criterion('smooth', 3, 8, smoothing=0.2)).__name__ == 'SmoothCriterion'
    with pytest.raises(ValueError, match='registered already'):
        register_method(Method('smooth', None, rule='dr'))


def test_a_missing_plugin_is_named(monkeypatch):
    monkeypatch.setenv('PMAL_PLUGINS', 'no_such_pmal_plugin')
    with pytest.raises(ValueError, match="PMAL_PLUGINS: cannot import plugin module 'no_such_pmal_plugin'"):
        get_method('softmax')


def test_a_registered_method_runs_through_pmal_reproduce(plugin, driver):
    folder, env = plugin
    profile = folder / 'tiny.yaml'
    profile.write_text('base: quick\nepochs: 2\ntsne_samples: 100\n')
    out = folder / 'store'
    args = ['run', '--out', str(out), '--set', 'method=smooth', '--set', f'profile={profile}']
    refused = subprocess.run(driver + args, env={k: v for k, v in env.items() if k != 'PMAL_PLUGINS'},
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "method must be one of" in refused.stderr and not out.exists()
    done = subprocess.run(driver + args, env=env, capture_output=True, text=True, timeout=600, cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    [record] = [json.loads(p.read_text()) for p in (out / 'records').glob('*.json')]
    assert record['status'] == 'done' and record['settings']['method'] == 'smooth' and record['key'].startswith('digits-s0-smooth-')
    assert record['summary']['rule'] == 'mls' and record['summary']['acc'] > 0.5  # its headline rule, from the registry (chance: 1/6)
    assert {'msp_auroc', 'mls_auroc'} <= set(record['metrics'])
