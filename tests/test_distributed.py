"""Two-process CPU (gloo) tests of pmal.distributed: DDP training equals one process, identical prototypes, row-split
robustness (the `torchrun` command line itself runs in nbs/24_distributed.ipynb, under nbdev_test)."""
import pytest
import torch
from torch import nn
from PIL import Image

import pmal.distributed as D
from pmal.batches import DeviceBatches, LoaderBatches
from pmal.data import ImageSet, load_openset
from pmal.mining import mine_prototypes
from pmal.models import EmbeddingClassifier
from pmal.pipeline import PMALConfig, PMALCriterion, mine_from_models
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


RECIPE = Recipe(epochs=2, lr=0.01, batch_size=16)
CASES = [(slice_free_net, False), (slice_free_net, True), (bn_dropout_net, True)]


def mining_inputs():
    "Embeddings, heads and labels of 4 classes in 2 spaces; a digits split and 2 small untrained models (K = 6)."
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(400) % 4
    zs = [torch.randn(400, 12, generator=g) + 2 * nn.functional.one_hot(labels, 12) for _ in range(2)]
    Ws = [torch.randn(4, 12, generator=g) for _ in range(2)]
    models = []
    for u in range(2):
        torch.manual_seed(u)
        m = EmbeddingClassifier(nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 16, 6)
        models.append(m.eval())
    return zs, Ws, labels, load_openset('digits'), models, PMALConfig(T=4)


def robustness_spaces():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1500, 8, generator=g)
    return [base + s * torch.randn(1500, 8, generator=g) for s in (0.1, 0.4)]


def on_every_rank():
    """Runs on every rank, in one process group (one launch: each costs two processes' imports): DDP training of each
    case, mining from embeddings and from models, and row-split robustness with block size 128 and the default."""
    zs, Ws, labels, split, models, config = mining_inputs()
    spaces = robustness_spaces()
    return dict(train=[train_on_ranks(RECIPE, make_net, with_prototypes) for make_net, with_prototypes in CASES],
                mine=(D.distributed_mine_prototypes(zs, Ws, labels, 5),
                      D.distributed_mine_from_models(models, split, config, 'cpu', None)),
                robustness=(D.distributed_topology_robustness(spaces, 'rms_excess', 128),
                            D.distributed_topology_robustness(spaces)))


@pytest.fixture(scope='module')
def ranks():
    "What `on_every_rank` returned on rank 0 and on rank 1."
    return D.launch(on_every_rank, 2)


def test_ddp_equals_one_process(ranks):
    "(a) 2 ranks with slices of 8 = 1 process with batches of 16 (softmax and PMAL's two-forward criterion)."
    for i, (_, with_prototypes) in enumerate(CASES[:2]):
        (h_a, s_a), (h_b, s_b) = (r['train'][i] for r in ranks)
        one = slice_free_net()
        h1 = fit(one, batches(), RECIPE, prototype_criterion() if with_prototypes else None, progress=False)
        assert no_time(h_a) == no_time(h_b)
        assert all(torch.isfinite(torch.tensor(e['loss'])) for e in h_a)
        for k in s_a:
            assert torch.equal(s_a[k], s_b[k]), k                       # bit-identical replicas
            torch.testing.assert_close(s_a[k], one.state_dict()[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close([e['loss'] for e in h_a], [e['loss'] for e in h1], rtol=1e-5, atol=1e-6)


def test_ddp_batchnorm_dropout_replicas_agree(ranks):
    "(a) With BatchNorm (per-rank statistics, averaged running stats) and dropout, ranks still hold identical weights."
    (h_a, s_a), (h_b, s_b) = (r['train'][2] for r in ranks)
    assert no_time(h_a) == no_time(h_b) and all(e['loss'] == e['loss'] for e in h_a)
    for k in s_a: assert torch.equal(s_a[k], s_b[k]), k
    assert not torch.equal(s_a['features.1.running_mean'], bn_dropout_net().state_dict()['features.1.running_mean'])


def test_ranks_mine_identical_prototypes(ranks):
    "(b) Mining on 2 ranks, from embeddings and from trained models: identical on both, equal to one process."
    zs, Ws, labels, split, models, config = mining_inputs()
    (p_a, a), (p_b, b) = (r['mine'] for r in ranks)
    ref = mine_prototypes(zs, Ws, labels, T=5)
    for p in (p_a, p_b):
        assert torch.equal(p.indices, ref.indices) and torch.equal(p.r, ref.r) and p.settings == ref.settings
    assert torch.equal(a.indices, b.indices) and torch.equal(a.r, b.r)
    one = mine_from_models(models, split, config)
    torch.testing.assert_close(a.r, one.r, rtol=1e-5, atol=1e-6)
    assert a.settings == one.settings


def test_robustness_split_by_rows_equals_one_process(ranks):
    "(c) Rows split across 2 ranks by blocks: the same r as topology_robustness, bit for bit."
    spaces = robustness_spaces()
    for r128, r in (r['robustness'] for r in ranks):
        assert torch.equal(r128, topology_robustness(spaces, block_size=128))
        torch.testing.assert_close(r, topology_robustness(spaces), rtol=1e-6, atol=1e-7)  # default block size, threads as set


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
