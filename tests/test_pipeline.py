"Package-level tests of pmal.pipeline: exact resume after SIGKILL in phase 1 and phase 2, no recomputation, caches, save/load."
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from pmal.data import load_openset
from pmal.pipeline import PMAL, PMALConfig, carve_validation, train_baseline, evaluate_model
from pmal.train import Recipe

torch.set_num_threads(1)
RECIPE = dict(epochs=3, lr=0.01, lr_step=2, batch_size=64, seed=0)

SCRIPT = textwrap.dedent('''
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from pmal.data import load_openset
    from pmal.pipeline import PMAL, PMALConfig
    from pmal.train import Recipe

    work, kill_stage, kill_epoch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    def on_epoch_end(stage, epoch, history):
        if stage == kill_stage and epoch == kill_epoch: os.kill(os.getpid(), signal.SIGKILL)
    split = load_openset('digits', 0)
    pmal = PMAL.for_split(split, recipe=Recipe(epochs=3, lr=0.01, lr_step=2, batch_size=64, seed=0),
                          config=PMALConfig(T=5), work_dir=work, progress=False, on_epoch_end=on_epoch_end).fit(split)
    pmal.save(os.path.join(work, 'final.pt'))
''')


@pytest.fixture(scope='module')
def split():
    return load_openset('digits', 0)


def _run(tmp_path, work, stage='none', epoch=-1):
    script = tmp_path / 'fit_pmal.py'
    script.write_text(SCRIPT)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, str(script), str(work), stage, str(epoch)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    "An uninterrupted run: its saved final model."
    tmp = tmp_path_factory.mktemp('straight')
    r = _run(tmp, tmp / 'work')
    assert r.returncode == 0, r.stderr
    return torch.load(tmp / 'work' / 'final.pt', weights_only=True)


def _assert_same_model(a, b):
    for part in ('model', 'criterion'):
        assert a[part].keys() == b[part].keys()
        for k, v in a[part].items():
            if isinstance(v, torch.Tensor): assert torch.equal(v, b[part][k]), (part, k)
    assert torch.equal(a['proto_indices'], b['proto_indices'])


@pytest.mark.parametrize('stage,epoch', [('phase1_model1', 0), ('phase2', 1)])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, straight, stage, epoch):
    work = tmp_path / 'work'
    r = _run(tmp_path, work, stage, epoch)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    assert not (work / 'final.pt').exists()
    done = sorted(p.name for p in work.iterdir())
    mtimes = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    assert ('prototypes.npz' in done) == (stage == 'phase2')
    r = _run(tmp_path, work)
    assert r.returncode == 0, r.stderr
    _assert_same_model(straight, torch.load(work / 'final.pt', weights_only=True))
    if stage == 'phase2':  # phase 1 and the mining were finished: their files were not rewritten
        for name in ('phase1_model0.pt', 'phase1_model1.pt', 'prototypes.npz'):
            assert (work / name).stat().st_mtime_ns == mtimes[name], name


def test_finished_stages_are_not_recomputed(tmp_path, split):
    work = tmp_path / 'work'
    first = PMAL.for_split(split, recipe=Recipe(**RECIPE), config=PMALConfig(T=5), work_dir=work, progress=False).fit(split)
    stamps = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    seen = []
    again = PMAL.for_split(split, recipe=Recipe(**RECIPE), config=PMALConfig(T=5), work_dir=work, progress=False,
                           on_epoch_end=lambda *a: seen.append(a[:2])).fit(split)
    assert seen == []  # no epoch of any stage ran again
    assert {p.name: p.stat().st_mtime_ns for p in work.iterdir()} == stamps
    assert torch.equal(again.scores(split.test_unknown)['dr'], first.scores(split.test_unknown)['dr'])


def test_prototypes_mined_with_other_settings_are_mined_again(tmp_path, split):
    work = tmp_path / 'work'
    PMAL.for_split(split, recipe=Recipe(**{**RECIPE, 'epochs': 1}), config=PMALConfig(T=5), work_dir=work,
                   progress=False).mine(split)
    with pytest.warns(UserWarning, match='mined with other settings'):
        p = PMAL.for_split(split, recipe=Recipe(**{**RECIPE, 'epochs': 1}), config=PMALConfig(T=3), work_dir=work,
                           progress=False).mine(split)
    assert p.prototypes.indices.shape == (6, 3)


def test_save_load_needs_no_training_data_and_no_pickled_code(tmp_path, split):
    pmal = PMAL.for_split(split, recipe=Recipe(**{**RECIPE, 'epochs': 2}), config=PMALConfig(T=4), progress=False).fit(split)
    pmal.save(tmp_path / 'p.pt')
    assert not (tmp_path / 'p.pt.tmp').exists()
    loaded = PMAL.load(tmp_path / 'p.pt')
    a, b = pmal.scores(split.test_known), loaded.scores(split.test_known)
    for k in ('msp', 'mls', 'dr'): torch.testing.assert_close(a[k], b[k])
    thr = a['dr'].median().item()
    assert torch.equal(pmal.predict(split.test_known, thr), loaded.predict(split.test_known, thr))
    assert (loaded.predict(split.test_known, thr) == -1).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_learn_before_mine_and_bad_options_fail_clearly(split):
    with pytest.raises(RuntimeError, match='mine'):
        PMAL.for_split(split, progress=False).learn(split)
    with pytest.raises(ValueError, match='proto_bn'):
        PMALConfig(proto_bn='frozen')


def test_validation_carving_never_touches_the_test_split(split):
    val = carve_validation(split, held_out=[2, 4], val_fraction=0.2, seed=1)
    assert val.num_classes == 4 and len(val.test_unknown) == int(torch.isin(split.train.y, torch.tensor([2, 4])).sum())
    train_rows = {bytes(r) for r in split.train.x.flatten(1).numpy()}
    for part in (val.train, val.test_known, val.test_unknown):
        assert all(bytes(r) in train_rows for r in part.x.flatten(1).numpy())
    assert carve_validation(split, [2, 4], 0.2, seed=1).train.y.tolist() == val.train.y.tolist()  # seeded


def test_baseline_training_is_seeded(split):
    recipe = Recipe(**{**RECIPE, 'epochs': 2})
    runs = [evaluate_model(*train_baseline('gcpl', split, recipe=recipe, progress=False), split, method='gcpl')
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert 0.0 <= runs[0]['gcpl_auroc'] <= 1.0 and runs[0]['gcpl_acc'] > 0.5


def test_concurrent_phase1_is_sequential_on_cpu(split):
    "concurrent=True changes nothing on a CPU (run_concurrently calls in turn there); it refuses a custom trainer."
    from pmal.pipeline import train_softmax_models
    from pmal.train import fit
    recipe = Recipe(epochs=1, lr=0.01, batch_size=64, seed=0)
    a = train_softmax_models(split, 'digits_net', recipe, 2, 'cpu', progress=False)
    b = train_softmax_models(split, 'digits_net', recipe, 2, 'cpu', progress=False, concurrent=True)
    for ma, mb in zip(a, b):
        for pa, pb in zip(ma.state_dict().values(), mb.state_dict().values()): assert torch.equal(pa, pb)
    assert not torch.equal(a[0].head.weight, a[1].head.weight)  # seeds recipe.seed + u
    with pytest.raises(ValueError, match='concurrent'):
        train_softmax_models(split, 'digits_net', recipe, 2, 'cpu', trainer=lambda *a, **k: fit(*a, **k), concurrent=True)


def _bn_tracked(model):
    return [m.num_batches_tracked.item() for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_phase2_prototype_pass_moves_running_statistics_once_per_step(split):
    "Audit defect: the K x T prototype pass in train mode moved BatchNorm's running statistics a second time every step."
    recipe = Recipe(epochs=1, lr=0.01, batch_size=64, seed=0)
    pmal = PMAL.for_split(split, recipe=recipe, config=PMALConfig(T=3), progress=False).fit(split)
    steps = -(-len(split.train) // 64)
    m1 = _bn_tracked(pmal.phase1_models[0])
    assert m1 and all(n == steps for n in m1)
    assert all(n == 2 * steps for n in _bn_tracked(pmal.model))  # M1's steps + phase 2's, never K x T passes more


def test_evaluate_model_scores_criteria_by_their_own_logits(split):
    "Audit defect: msp_*/mls_* of GCPL/RPL/ARPL came from the linear head those criteria never train."
    from pmal.pipeline import embed_part, part_labels
    from pmal.rejection import evaluate_rejection
    model, crit = train_baseline('rpl', split, recipe=Recipe(**{**RECIPE, 'epochs': 1}), progress=False)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.head.parameters())  # the head is not trained
    res = evaluate_model(model, crit, split, method='rpl')
    (zk, _), (zu, _) = [embed_part(model, p, split) for p in (split.test_known, split.test_unknown)]
    with torch.no_grad():
        own = evaluate_rejection(crit.scores(zk), part_labels(split.test_known), crit.scores(zu))
    for k in ('msp_auroc', 'mls_auroc', 'msp_acc'):
        assert res[k] == pytest.approx(own[k])


def test_train_baseline_starts_from_init(split):
    "train_baseline(init=state_dict) continues from given weights (the equal-budget softmax control)."
    recipe = Recipe(**{**RECIPE, 'epochs': 1})
    m1, _ = train_baseline('softmax', split, recipe=recipe, progress=False)
    zero, _ = train_baseline('softmax', split, recipe=Recipe(**{**RECIPE, 'epochs': 0}), progress=False,
                             init=m1.state_dict())
    for a, b in zip(m1.state_dict().values(), zero.state_dict().values()): assert torch.equal(a, b)


# --- issue 12: settings checked when made, a saved model carries its prototypes, damaged files named or recomputed ---

@pytest.mark.parametrize('bad, message', [
    (dict(eps=2), 'eps must be in [0, 1]'), (dict(eps=-1), 'eps must be in [0, 1]'), (dict(delta=-3), 'delta must be >= 0'),
    (dict(lambda_p=-0.5), 'lambda_p must be >= 0'), (dict(eps=float('nan')), 'eps must be a finite number'),
    (dict(T=2.5), 'T must be an integer'), (dict(scaling='cube'), "scaling='cube'"), (dict(landmarks=0), 'landmarks must be'),
    (dict(mc_samples=0), 'mc_samples must be >= 1'),
])
def test_out_of_range_pmal_settings_are_refused(bad, message):
    with pytest.raises(ValueError) as e:
        PMALConfig(**bad)
    assert message in str(e.value)


def test_a_loaded_model_has_its_prototypes(tmp_path, split):
    pmal = PMAL.for_split(split, recipe=Recipe(**{**RECIPE, 'epochs': 1}), config=PMALConfig(T=3), progress=False).fit(split)
    pmal.save(tmp_path / 'p.pt')
    loaded = PMAL.load(tmp_path / 'p.pt')
    assert loaded.prototypes is not None
    for k in ('indices', 'r', 'candidates', 'labels'): assert torch.equal(getattr(loaded.prototypes, k), getattr(pmal.prototypes, k))
    assert loaded.prototypes.settings == pmal.prototypes.settings and loaded.prototypes.T == 3
    thr = pmal.scores(split.test_known)['dr'].median().item()
    assert torch.equal(loaded.predict(split.test_unknown, thr), pmal.predict(split.test_unknown, thr))
    (tmp_path / 'cut.pt').write_bytes((tmp_path / 'p.pt').read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"checkpoint {tmp_path / 'cut.pt'} is damaged"):
        PMAL.load(tmp_path / 'cut.pt')


def test_damaged_prototypes_are_mined_again(tmp_path, split):
    kw = dict(recipe=Recipe(**{**RECIPE, 'epochs': 1}), config=PMALConfig(T=3), work_dir=tmp_path, progress=False)
    first = PMAL.for_split(split, **kw).mine(split)
    (tmp_path / 'prototypes.npz').write_bytes((tmp_path / 'prototypes.npz').read_bytes()[:300])
    with pytest.warns(UserWarning, match=r'prototypes file .*prototypes.npz is damaged.*moved to prototypes.npz.damaged'):
        again = PMAL.for_split(split, **kw).mine(split)
    assert torch.equal(again.prototypes.indices, first.prototypes.indices)


def test_images_a_backbone_cannot_take_fail_before_training(tmp_path, split):
    from pmal.batches import downsample_split
    tiny = downsample_split(split, 1)  # 1 x 1 images: digits_net's pooling leaves nothing
    with pytest.raises(ValueError, match=r'backbone digits_net cannot take images of 1 x 1 x 1'):
        PMAL.for_split(tiny, backbone='digits_net', recipe=Recipe(**RECIPE), work_dir=tmp_path, progress=False).fit(tiny)
    with pytest.raises(ValueError, match=r'backbone digits_net cannot take images of 1 x 1 x 1'):
        train_baseline('softmax', tiny, 'digits_net', Recipe(**RECIPE), work_dir=tmp_path / 'b', progress=False)
    assert not list(tmp_path.rglob('*.pt'))
