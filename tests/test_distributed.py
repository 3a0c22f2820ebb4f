"Two-process CPU (gloo) tests of pmal.distributed: DDP training equals one process, identical prototypes, row-split robustness."
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from PIL import Image

import pmal.distributed as D
from pmal.batches import DeviceBatches, LoaderBatches
from pmal.data import ImageSet, load_openset
from pmal.mining import mine_prototypes
from pmal.models import EmbeddingClassifier
from pmal.pipeline import PMAL, PMALConfig, PMALCriterion, mine_from_models
from pmal.robustness import topology_robustness
from pmal.train import Recipe, fit

torch.set_num_threads(1)


def images(n=48, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g), torch.arange(n) % k)


def batches(n=48, batch=16, seed=0):
    return DeviceBatches(images(n), batch, shuffle=True, augment='crop_flip', mean=(0.5,), std=(0.25,), seed=seed)


def slice_free_net(K=4, seed=0):
    "No BatchNorm, no dropout: nothing depends on how a batch is split."
    torch.manual_seed(seed)
    return EmbeddingClassifier(nn.Sequential(nn.Conv2d(1, 8, 3), nn.Tanh(), nn.Conv2d(8, 8, 3), nn.Tanh(),
                                             nn.AdaptiveAvgPool2d(1), nn.Flatten()), 8, K)


def bn_dropout_net(K=4, seed=0):
    torch.manual_seed(seed)
    return EmbeddingClassifier(nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.3),
                                             nn.AdaptiveAvgPool2d(1), nn.Flatten()), 8, K)


def prototype_criterion():
    "PMALCriterion with 2 prototype images per class taken from the training set (no augmentation)."
    im = images()
    x = next(iter(DeviceBatches(im, len(im), shuffle=False, mean=(0.5,), std=(0.25,)).epoch(0)))[0]
    idx = torch.stack([torch.nonzero(im.y == k).flatten()[:2] for k in range(4)])
    return PMALCriterion(x[idx], PMALConfig(T=2))


def train_on_ranks(recipe, make_net, with_prototypes):
    "Runs on every rank: distributed_fit; returns the history and the final state."
    model = make_net()
    crit = prototype_criterion() if with_prototypes else None
    history = D.distributed_fit(model, batches(), recipe, crit, None, 'cpu', False)
    return history, {k: v.clone() for k, v in model.state_dict().items()}


def no_time(h): return [{k: v for k, v in e.items() if k != 'time'} for e in h]


def test_ddp_equals_one_process():
    "(a) 2 ranks with slices of 8 = 1 process with batches of 16 (softmax and PMAL's two-forward criterion)."
    recipe = Recipe(epochs=2, lr=0.01, batch_size=16)
    for with_prototypes in (False, True):
        one = slice_free_net()
        h1 = fit(one, batches(), recipe, prototype_criterion() if with_prototypes else None, progress=False)
        ranks = D.launch(train_on_ranks, 2, recipe, slice_free_net, with_prototypes)
        (h_a, s_a), (h_b, s_b) = ranks
        assert no_time(h_a) == no_time(h_b)
        assert all(torch.isfinite(torch.tensor(e['loss'])) for e in h_a)
        for k in s_a:
            assert torch.equal(s_a[k], s_b[k]), k                       # bit-identical replicas
            torch.testing.assert_close(s_a[k], one.state_dict()[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close([e['loss'] for e in h_a], [e['loss'] for e in h1], rtol=1e-5, atol=1e-6)


def test_ddp_batchnorm_dropout_replicas_agree():
    "(a) With BatchNorm (per-rank statistics, averaged running stats) and dropout, ranks still hold identical weights."
    (h_a, s_a), (h_b, s_b) = D.launch(train_on_ranks, 2, Recipe(epochs=2, lr=0.01, batch_size=16), bn_dropout_net, True)
    assert no_time(h_a) == no_time(h_b) and all(e['loss'] == e['loss'] for e in h_a)
    for k in s_a: assert torch.equal(s_a[k], s_b[k]), k
    assert not torch.equal(s_a['features.1.running_mean'], bn_dropout_net().state_dict()['features.1.running_mean'])


def embed_and_mine(split, models, config):
    return D.distributed_mine_from_models(models, split, config, 'cpu', None)


def test_ranks_mine_identical_prototypes():
    "(b) Mining from trained models on 2 ranks: identical on both, equal to one process (and to mine_prototypes)."
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(400) % 4
    zs = [torch.randn(400, 12, generator=g) + 2 * nn.functional.one_hot(labels, 12) for _ in range(2)]
    Ws = [torch.randn(4, 12, generator=g) for _ in range(2)]
    ref = mine_prototypes(zs, Ws, labels, T=5)
    for p in D.launch(D.distributed_mine_prototypes, 2, zs, Ws, labels, 5):
        assert torch.equal(p.indices, ref.indices) and torch.equal(p.r, ref.r) and p.settings == ref.settings

    split = load_openset('digits')
    config = PMALConfig(T=4)
    models = []
    for u in range(2):
        torch.manual_seed(u)
        m = EmbeddingClassifier(nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 16, 6)
        models.append(m.eval())
    a, b = D.launch(embed_and_mine, 2, split, models, config)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.r, b.r)
    one = mine_from_models(models, split, config)
    torch.testing.assert_close(a.r, one.r, rtol=1e-5, atol=1e-6)
    assert a.settings == one.settings


def test_robustness_split_by_rows_equals_one_process():
    "(c) Rows split across 2 ranks by blocks: the same r as topology_robustness, bit for bit."
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1500, 8, generator=g)
    spaces = [base + s * torch.randn(1500, 8, generator=g) for s in (0.1, 0.4)]
    for r in D.launch(D.distributed_topology_robustness, 2, spaces, 'rms_excess', 128):
        assert torch.equal(r, topology_robustness(spaces, block_size=128))
    for r in D.launch(D.distributed_topology_robustness, 2, spaces):  # default block size, threads as set
        torch.testing.assert_close(r, topology_robustness(spaces), rtol=1e-6, atol=1e-7)


class PILSet(torch.utils.data.Dataset):
    def __init__(self, im): self.im = im
    def __len__(self): return len(self.im)
    def __getitem__(self, i): return Image.fromarray(self.im.x[i, 0].numpy()), int(self.im.y[i])


@pytest.mark.parametrize('kind', ['device', 'loader'])
def test_shards_rejoin_to_the_global_batches(kind):
    "Every rank's slice, put back together, is the one-process batch (minus the last n % W samples)."
    im = images(50)
    b = batches(50, 16, seed=3) if kind == 'device' else LoaderBatches(
        PILSet(im), 16, shuffle=True, augment='crop_flip', mean=(0.5,), std=(0.25,), seed=1, image_size=8, num_workers=0)
    for W in (2, 3):
        for e in (0, 1):
            parts = [list(D.ShardedBatches(b, w, W).epoch(e)) for w in range(W)]
            full = [(x, y) for x, y in b.epoch(e) if len(y) >= W]
            assert len(parts[0]) == len(full)
            for i, (x, y) in enumerate(full):
                xs, ys = torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])
                n = len(y) // W * W
                assert torch.equal(ys, y[:n]) and torch.equal(xs, x[:n])


def test_torchrun_command_line(tmp_path):
    "python -m torch.distributed.run --nproc_per_node 2 -m pmal.distributed: a whole PMAL run on 2 CPU processes."
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'pmal.distributed',
           '--dataset', 'digits', '--epochs', '1', '--T', '3', '--device', 'cpu', '--batch-size', '64',
           '--work-dir', str(tmp_path / 'run'), '--json', str(tmp_path / 'out.json')]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads((tmp_path / 'out.json').read_text())
    assert (rec['ranks'], rec['global_batch'], len(rec['prototypes'][0])) == (2, 64, 3)
    assert 0 <= rec['metrics']['dr_auroc'] <= 1
    assert sorted(p.name for p in (tmp_path / 'run').iterdir()) == \
        ['phase1_model0.pt', 'phase1_model1.pt', 'phase2.pt', 'pmal.pt', 'prototypes.npz']
    PMAL.load(tmp_path / 'run' / 'pmal.pt')
