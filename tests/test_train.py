"Package-level tests of pmal.train: recipes, non-finite losses, atomic checkpoints, exact resume after SIGKILL."
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pmal.batches import make_batches
from pmal.data import ImageSet, load_openset
from pmal.models import digits_net
from pmal.train import (IMAGENET_RECIPE, PAPER_RECIPE, NonFiniteLossError, Recipe, SoftmaxCriterion, atomic_save,
                        embed, fit, seed_everything, trainable_parameters)

torch.set_num_threads(1)
TINY = Recipe(epochs=3, lr=0.01, lr_step=2, batch_size=64, seed=0)


@pytest.fixture(scope='module')
def split():
    return load_openset('digits', 0)


def batches_of(split, recipe=TINY):
    return make_batches(split.train, split, recipe.batch_size, train=True, device='cpu', seed=recipe.seed)


class ScaledCE(nn.Module):
    "Cross-entropy on logits times a learnable scale: a criterion with its own parameter."
    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, model, x, y):
        _, logits = model(x)
        logits = logits * self.log_scale.exp()
        return F.cross_entropy(logits, y), logits


class NaNAt(nn.Module):
    "Cross-entropy that turns NaN at one (epoch, step), counting calls."
    def __init__(self, steps_per_epoch, epoch, step):
        super().__init__()
        self.calls, self.at = 0, epoch * steps_per_epoch + step

    def forward(self, model, x, y):
        loss, logits = SoftmaxCriterion()(model, x, y)
        self.calls += 1
        return (loss * float('nan') if self.calls - 1 == self.at else loss), logits


# --- recipes -------------------------------------------------------------------------------------------

def test_paper_recipe_defaults():
    r = Recipe()
    assert r == PAPER_RECIPE
    assert (r.optimizer, r.lr, r.lr_step, r.lr_gamma, r.epochs, r.batch_size, r.weight_decay, r.beta1) == \
        ('adam', 0.01, 120, 0.1, 600, 128, 5e-4, 0.9)
    assert (r.amp, r.channels_last, r.compile) == (False, False, False)


def test_imagenet_recipe():
    r = IMAGENET_RECIPE
    assert (r.optimizer, r.lr, r.lr_step, r.lr_gamma, r.momentum) == ('sgd', 0.2, 30, 0.1, 0.9)
    assert (r.epochs, r.batch_size, r.weight_decay) == (90, 256, 1e-4)


def test_recipe_validation():
    with pytest.raises(ValueError, match="'adam' or 'sgd'"):
        Recipe(optimizer='rmsprop')
    with pytest.raises(ValueError, match='lr_step'):
        Recipe(lr_step=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PAPER_RECIPE.lr = 1.0


# --- criterion parameters ------------------------------------------------------------------------------

def test_criterion_params_are_optimised_and_saved(split, tmp_path):
    seed_everything(0)
    model, crit = digits_net(6), ScaledCE()
    assert trainable_parameters(model, crit)[-1] is crit.log_scale
    fit(model, batches_of(split), TINY, crit, checkpoint=tmp_path / 'c.pt', progress=False)
    assert crit.log_scale.item() != 0.0
    s = torch.load(tmp_path / 'c.pt', weights_only=True)
    assert torch.equal(s['criterion']['log_scale'], crit.log_scale.detach())
    n_model = len(list(model.parameters()))
    groups = s['optimizer']['param_groups']  # the model's parameters, then the criterion's (no weight decay)
    assert [len(g['params']) for g in groups] == [n_model, 1] and groups[1]['weight_decay'] == 0.0


def test_sgd_recipe_trains(split):
    seed_everything(0)
    model = digits_net(6)
    h = fit(model, batches_of(split), dataclasses.replace(TINY, optimizer='sgd', lr=0.05), progress=False)
    assert h[-1]['loss'] < h[0]['loss']


# --- non-finite loss -----------------------------------------------------------------------------------

def test_non_finite_loss_names_epoch_and_step(split, tmp_path):
    b = batches_of(split)
    seed_everything(0)
    model = digits_net(6)
    ckpt = tmp_path / 'c.pt'
    with pytest.raises(NonFiniteLossError, match=r'epoch 1, step 2') as e:
        fit(model, b, TINY, NaNAt(len(b), 1, 2), checkpoint=ckpt, progress=False)
    assert (e.value.epoch, e.value.step) == (1, 2)
    assert 'lower the learning rate' in str(e.value)
    # on CPU the bad step is never applied: weights are finite, the epoch-0 checkpoint is intact
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.load(ckpt, weights_only=True)['epoch'] == 1
    assert sorted(os.listdir(tmp_path)) == ['c.pt']


def test_large_lr_is_caught(split):
    seed_everything(0)
    model = digits_net(6)
    with pytest.raises(NonFiniteLossError, match='epoch'):
        fit(model, batches_of(split), dataclasses.replace(TINY, lr=1e30, optimizer='sgd'), progress=False)


# --- checkpoints ----------------------------------------------------------------------------------------

def test_checkpoint_contents_and_no_tmp(split, tmp_path):
    seed_everything(0)
    ckpt = tmp_path / 'run' / 'c.pt'
    seen = []
    fit(digits_net(6), batches_of(split), TINY, checkpoint=ckpt, progress=False,
        on_epoch_end=lambda e, h: seen.append(sorted(os.listdir(ckpt.parent))))
    assert seen == [['c.pt']] * TINY.epochs          # after every epoch: the checkpoint and nothing else
    s = torch.load(ckpt, weights_only=True)
    assert set(s) >= {'model', 'criterion', 'optimizer', 'scheduler', 'epoch', 'history', 'recipe', 'rng_cpu'}
    assert s['epoch'] == TINY.epochs and len(s['history']) == TINY.epochs
    assert s['recipe'] == dataclasses.asdict(TINY)
    assert s['scheduler']['last_epoch'] == TINY.epochs


def test_atomic_save_crash_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / 'c.pt'
    atomic_save({'v': torch.tensor(1)}, path)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b'partial')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError, match='disk full'):
        atomic_save({'v': torch.tensor(2)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ['c.pt']


def test_finished_checkpoint_returns_immediately(split, tmp_path):
    seed_everything(0)
    model = digits_net(6)
    h = fit(model, batches_of(split), TINY, checkpoint=tmp_path / 'c.pt', progress=False)
    calls = []
    seed_everything(1)
    other = digits_net(6)
    h2 = fit(other, batches_of(split), TINY, checkpoint=tmp_path / 'c.pt', progress=False,
             on_epoch_end=lambda e, hist: calls.append(e))
    assert calls == [] and h2 == h
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_of_another_recipe_is_refused(split, tmp_path):
    seed_everything(0)
    fit(digits_net(6), batches_of(split), TINY, checkpoint=tmp_path / 'c.pt', progress=False)
    with pytest.raises(ValueError, match='differs in lr'):
        fit(digits_net(6), batches_of(split), dataclasses.replace(TINY, lr=0.1), checkpoint=tmp_path / 'c.pt',
            progress=False)


def test_seeded_runs_are_identical(split):
    runs = []
    for _ in range(2):
        seed_everything(0)
        model = digits_net(6)
        fit(model, batches_of(split), TINY, progress=False)   # dropout masks come from the seeded generator
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


# --- exact resume after a real kill ---------------------------------------------------------------------

SCRIPT = textwrap.dedent('''
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from pmal.batches import make_batches
    from pmal.data import load_openset
    from pmal.models import digits_net
    from pmal.train import Recipe, fit, seed_everything
    from helper_criterion import ScaledCE

    ckpt, kill_after, init_seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    split = load_openset('digits', 0)
    recipe = Recipe(epochs=4, lr=0.01, lr_step=2, batch_size=64, seed=3)
    seed_everything(init_seed)
    model = digits_net(split.num_classes, split.image_shape[0])
    batches = make_batches(split.train, split, recipe.batch_size, train=True, device='cpu', seed=recipe.seed)

    def on_epoch_end(epoch, history):
        if epoch == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    fit(model, batches, recipe, ScaledCE(), checkpoint=ckpt, progress=False, on_epoch_end=on_epoch_end)
''')

HELPER = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ScaledCE(nn.Module):
        def __init__(self):
            super().__init__()
            self.log_scale = nn.Parameter(torch.zeros(()))

        def forward(self, model, x, y):
            _, logits = model(x)
            logits = logits * self.log_scale.exp()
            return F.cross_entropy(logits, y), logits
''')


def _run(script, *args):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=120)


def _assert_same(a, b):
    "Two checkpoint dicts hold bitwise equal training state."
    for part in ('model', 'criterion'):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for ka, kb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        for k in ka:
            assert torch.equal(ka[k], kb[k]), k
    assert a['scheduler'] == b['scheduler'] and a['epoch'] == b['epoch']
    strip = lambda h: [{k: v for k, v in r.items() if k != 'time'} for r in h]
    assert strip(a['history']) == strip(b['history'])


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    script = tmp_path / 'train_digits.py'
    script.write_text(SCRIPT)
    (tmp_path / 'helper_criterion.py').write_text(HELPER)
    straight, killed = tmp_path / 'straight.pt', tmp_path / 'killed.pt'

    r = _run(script, straight, -1, 0)
    assert r.returncode == 0, r.stderr

    r = _run(script, killed, 1, 0)                       # dies right after epoch 1's checkpoint
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    s = torch.load(killed, weights_only=True)
    assert s['epoch'] == 2 and len(s['history']) == 2
    assert not (tmp_path / 'killed.pt.tmp').exists()
    shutil.copy(killed, tmp_path / 'killed_copy.pt')

    r = _run(script, killed, -1, 7)                      # other init seed: everything must come from the file
    assert r.returncode == 0, r.stderr
    a, b = torch.load(straight, weights_only=True), torch.load(killed, weights_only=True)
    assert a['epoch'] == 4
    _assert_same(a, b)

    # control: the comparison is sensitive to the restored state (here torch's RNG, which drives dropout):
    # resuming the killed run's checkpoint with another RNG state gives other weights
    c = torch.load(tmp_path / 'killed_copy.pt', weights_only=True)
    c['rng_cpu'] = torch.Generator().manual_seed(12345).get_state()
    torch.save(c, tmp_path / 'bad_rng.pt')
    split = load_openset('digits', 0)
    recipe = Recipe(epochs=4, lr=0.01, lr_step=2, batch_size=64, seed=3)
    fit(digits_net(6), batches_of(split, recipe), recipe, ScaledCE(), checkpoint=tmp_path / 'bad_rng.pt',
        progress=False)
    bad = torch.load(tmp_path / 'bad_rng.pt', weights_only=True)
    with pytest.raises(AssertionError):
        _assert_same(a, bad)


# --- embed ----------------------------------------------------------------------------------------------

def test_embed(split):
    seed_everything(0)
    model = digits_net(6)
    fit(model, batches_of(split), dataclasses.replace(TINY, epochs=1), progress=False)
    model.train()
    part = split.test_known
    z, logits = embed(model, part, split.mean, split.std, batch_size=100)
    assert model.training                                # mode restored
    assert z.shape == (len(part), model.embed_dim) and logits.shape == (len(part), 6)
    assert z.dtype == logits.dtype == torch.float32 and z.device.type == 'cpu'
    # eval mode, in order, equal to one forward pass of the normalised images
    model.eval()
    x = (part.x.float() / 255 - torch.tensor(split.mean).view(1, -1, 1, 1)) / torch.tensor(split.std).view(1, -1, 1, 1)
    with torch.no_grad():
        z_ref, l_ref = model(x)
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, model.head(z), rtol=1e-5, atol=1e-5)
    z2, _ = embed(model, part, split.mean, split.std)
    assert torch.equal(z, z2) or torch.allclose(z, z2, atol=1e-6)
    with pytest.raises(ValueError, match='empty'):
        embed(model, ImageSet(part.x[:0], part.y[:0]), split.mean, split.std)


def test_bad_batches_type():
    with pytest.raises(TypeError, match='make_batches'):
        fit(digits_net(6), [1, 2, 3], TINY, progress=False)


def test_criterion_points_are_not_weight_decayed(split):
    "Learned points of a criterion (GCPL/RPL/ARPL) get no weight decay, as in their reference code; the model does."
    from pmal.train import prepare_training
    model, crit = digits_net(6, 1), ScaledCE()
    optimizer = prepare_training(model, crit, TINY, torch.device('cpu'))[0]
    assert [g['weight_decay'] for g in optimizer.param_groups] == [TINY.weight_decay, 0.0]
    assert optimizer.param_groups[1]['params'] == [crit.log_scale]
    # a zero-gradient point stays where it is under Adam with weight decay (it would shrink if decayed)
    torch.manual_seed(0)
    model, crit = digits_net(6, 1), ScaledCE()
    with torch.no_grad(): crit.log_scale.fill_(3.0)
    crit.log_scale.register_hook(lambda g: torch.zeros_like(g))
    fit(model, batches_of(split, dataclasses.replace(TINY, epochs=1, weight_decay=0.1)),
        dataclasses.replace(TINY, epochs=1, weight_decay=0.1), crit, progress=False)
    assert crit.log_scale.item() == 3.0


def test_cpu_amp_trains_in_bfloat16_and_is_deterministic(split):
    "Recipe(amp=True, channels_last=True) applies on a CPU: bf16 autocast, same weights for the same seed."
    seen = []
    class Probe(nn.Module):
        def __init__(self):
            super().__init__(); self.net = digits_net(6, 1); self.head = self.net.head
        def forward(self, x):
            seen.append((x.is_contiguous(memory_format=torch.channels_last), self.net(x)[1].dtype))
            return self.net(x)
    recipe = dataclasses.replace(TINY, epochs=1, amp=True, channels_last=True)
    weights = []
    for _ in range(2):
        torch.manual_seed(0); model = Probe()
        fit(model, batches_of(split, recipe), recipe, progress=False)
        weights.append([t.clone() for t in model.state_dict().values()])
    assert seen[0] == (True, torch.bfloat16)
    for a, b in zip(*weights): assert torch.equal(a, b)


# --- issue 12: every recipe value is checked when the recipe is made; a damaged checkpoint costs its epochs only ---

@pytest.mark.parametrize('bad, message', [
    (dict(weight_decay=-1e-4), 'weight_decay must be >= 0'), (dict(beta1=1.5), 'beta1 must be in [0, 1)'),
    (dict(beta2=1.0), 'beta2 must be in [0, 1)'), (dict(momentum=-0.9), 'momentum must be >= 0'),
    (dict(lr=float('nan')), 'lr must be a finite number'), (dict(lr=float('inf')), 'lr must be a finite number'),
    (dict(seed=-1), 'seed must be >= 0'), (dict(epochs=2.5), 'epochs must be an integer'),
    (dict(lr='1e-3'), 'lr must be a finite number'), (dict(amp='yes'), 'amp must be true or false'),
])
def test_out_of_range_recipes_are_refused(bad, message):
    with pytest.raises(ValueError) as e:
        Recipe(**bad)
    assert message in str(e.value)


def test_a_truncated_checkpoint_is_named_set_aside_and_its_stage_trained_again(tmp_path, split):
    ckpt = tmp_path / 'model.pt'
    seed_everything(0); straight = digits_net(6)
    fit(straight, batches_of(split), TINY, checkpoint=ckpt, progress=False)
    with open(ckpt, 'r+b') as f: f.truncate(1000)                       # truncate -s 1000 model.pt
    seed_everything(0); again = digits_net(6)
    with pytest.warns(UserWarning, match=rf'checkpoint {ckpt} is damaged .*moved to model.pt.damaged'):
        history = fit(again, batches_of(split), TINY, checkpoint=ckpt, progress=False)
    assert len(history) == TINY.epochs and sorted(p.name for p in tmp_path.iterdir()) == ['model.pt', 'model.pt.damaged']
    for k, v in straight.state_dict().items(): assert torch.equal(v, again.state_dict()[k]), k
    import pmal.train
    with pytest.raises(pmal.train.CheckpointError, match=r'model.pt.damaged is damaged or not a pmal checkpoint'):
        pmal.train.read_checkpoint(tmp_path / 'model.pt.damaged')


@pytest.mark.parametrize('units, amp, warns', [(False, True, True), (True, True, False), (False, False, False)])
def test_bf16_on_a_cpu_without_bf16_units_warns_before_training(split, monkeypatch, units, amp, warns):
    "bf16 autocast is emulated (about 10x slower than float32) on an x86 CPU without AVX512-BF16 or AMX: fit says so."
    import platform
    import warnings
    from pmal.train import SlowBF16Warning, cpu_has_bf16_units
    monkeypatch.setattr(platform, 'machine', lambda: 'x86_64')
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: units)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False)
    assert cpu_has_bf16_units() is units
    recipe = dataclasses.replace(TINY, epochs=1, amp=amp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        fit(digits_net(6), batches_of(split, recipe), recipe, progress=False)
    slow = [w for w in caught if issubclass(w.category, SlowBF16Warning)]
    assert len(slow) == int(warns)
    if warns: assert 'tiny_cpu_fp32' in str(slow[0].message) and slow[0].filename == __file__  # points at the caller


def test_bf16_units_are_unknown_off_x86(monkeypatch):
    import platform
    from pmal.train import cpu_bf16_warning, cpu_has_bf16_units
    monkeypatch.setattr(platform, 'machine', lambda: 'arm64')
    assert cpu_has_bf16_units() is None and cpu_bf16_warning(Recipe(amp=True)) is None
