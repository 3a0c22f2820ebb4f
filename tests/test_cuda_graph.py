"On a GPU: training with Recipe(cuda_graph=True) gives the eager loop's weights, for every criterion of the library."
import dataclasses
from functools import partial

import pytest
import torch
from torch import nn

from pmal.methods import create_criterion
from pmal.batches import make_batches
from pmal.data import load_openset
from pmal.models import digits_net
from pmal.pipeline import PMALCriterion, PMALConfig, prototype_inputs, train_softmax_models
from pmal.train import CUDAGraphStep, NonFiniteLossError, Recipe, fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs need a CUDA device')
# lr changes every epoch (a new capture each time); 64 does not divide the training set (an eager last batch)
RECIPE = Recipe(epochs=3, lr=0.01, lr_step=1, lr_gamma=0.5, batch_size=64, seed=0)


@pytest.fixture(scope='module')
def split():
    return load_openset('digits', 0)


def no_dropout_net(split, seed=0):
    "digits_net with its dropout off, so that the eager and the graphed run draw no random numbers."
    torch.manual_seed(seed)
    net = digits_net(split.num_classes, split.image_shape[0])
    for m in net.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd): m.p = 0.0
    return net


def train(split, recipe, criterion=None, **kw):
    model = no_dropout_net(split)
    batches = make_batches(split.train, split, recipe.batch_size, train=True, device='cuda', seed=recipe.seed)
    history = fit(model, batches, recipe, criterion, device='cuda', progress=False, **kw)
    return model, history


def assert_same_training(a, b, tol=2e-3):
    "Same loss per epoch and same weights (each tensor within `tol` of its norm): a lost update or a stale lr fails."
    (ma, ha), (mb, hb) = a, b
    torch.testing.assert_close([r['loss'] for r in ha], [r['loss'] for r in hb], rtol=tol, atol=0)
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        if pa.is_floating_point():
            rel = ((pa - pb).norm() / pa.norm().clamp_min(1e-12)).item()
            assert rel < tol, f"{name}: |a - b| / |a| = {rel:.2e}"


def eager_twin(split, recipe, criterion=None, **kw):
    "The same training as a graphed one, every step eager (same capturable optimiser): the reference of the graph."
    saved = CUDAGraphStep.warmup
    CUDAGraphStep.warmup = 10**9
    try: return train(split, recipe, criterion, **kw)
    finally: CUDAGraphStep.warmup = saved


@pytest.fixture(autouse=True)
def deterministic_cudnn():
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


@pytest.mark.parametrize('optimizer', ['adam', 'sgd'])
def test_graph_gives_the_eager_weights(split, optimizer):
    recipe = dataclasses.replace(RECIPE, optimizer=optimizer, cuda_graph=True)
    assert_same_training(eager_twin(split, recipe), train(split, recipe))


@pytest.mark.parametrize('optimizer', ['adam', 'sgd'])
def test_graph_trains_like_plain_eager(split, optimizer):
    "Against the plain eager loop (Adam not capturable): rounding differs, Adam amplifies it; the training does not."
    recipe = dataclasses.replace(RECIPE, optimizer=optimizer)
    (_, plain), (_, graphed) = train(split, recipe), train(split, dataclasses.replace(recipe, cuda_graph=True))
    torch.testing.assert_close([r['loss'] for r in plain], [r['loss'] for r in graphed], rtol=0.05, atol=0)
    assert abs(plain[-1]['acc'] - graphed[-1]['acc']) < 0.02


def test_graph_replays_and_recaptures(split, monkeypatch):
    captures, replays = [], []
    orig_capture = CUDAGraphStep._capture
    monkeypatch.setattr(CUDAGraphStep, '_capture', lambda self, x, y: (captures.append(len(y)), orig_capture(self, x, y)))
    orig_replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, 'replay', lambda self: (replays.append(1), orig_replay(self)))
    _, history = train(split, dataclasses.replace(RECIPE, cuda_graph=True))
    steps = -(-len(split.train) // RECIPE.batch_size)
    assert captures == [64] * 3                               # once per learning rate
    assert len(replays) == 3 * (steps - 1) - 3                # full batches, less the three warm-up steps
    assert history[-1]['acc'] > 0.7


def test_graph_with_amp_and_channels_last(split):
    recipe = dataclasses.replace(RECIPE, amp=True, channels_last=True, cuda_graph=True)
    assert_same_training(eager_twin(split, recipe), train(split, recipe), tol=2e-2)  # bf16 rounding grows over steps


@pytest.mark.parametrize('method', ['pmal', 'gcpl', 'rpl', 'arpl'])
def test_graph_for_every_criterion(split, method):
    def criterion():
        if method != 'pmal': return create_criterion(method, split.num_classes, 64)
        torch.manual_seed(1)
        idx = torch.stack([torch.nonzero(split.train.y == k)[:4, 0] for k in range(split.num_classes)])
        return PMALCriterion(prototype_inputs(split, idx), PMALConfig(T=4))
    recipe = dataclasses.replace(RECIPE, cuda_graph=True)
    assert_same_training(eager_twin(split, recipe, criterion()), train(split, recipe, criterion()))


def test_resume_across_modes(split, tmp_path):
    "A run checkpointed eagerly and resumed with graphs (and the reverse) trains as an uninterrupted one."
    class Stop(Exception): pass
    def stop_after(k):
        def cb(epoch, history):
            if epoch == k: raise Stop()
        return cb
    for optimizer in ('sgd', 'adam'):  # Adam: its step count moves between the CPU (eager) and the GPU (capturable)
        recipe = dataclasses.replace(RECIPE, optimizer=optimizer)
        straight = train(split, recipe)
        for first, then in ((False, True), (True, False)):
            ck = tmp_path / f'{optimizer}{first}.pt'
            with pytest.raises(Stop):
                train(split, dataclasses.replace(recipe, cuda_graph=first), checkpoint=ck, on_epoch_end=stop_after(0))
            resumed = train(split, dataclasses.replace(recipe, cuda_graph=then), checkpoint=ck)
            if optimizer == 'sgd': assert_same_training(straight, resumed)
            else: torch.testing.assert_close([r['loss'] for r in straight[1]], [r['loss'] for r in resumed[1]], rtol=0.05, atol=0)


def test_non_finite_loss_under_graph(split):
    bad = dataclasses.replace(split, std=tuple(0.0 for _ in split.std))  # x / 0: inf inputs, NaN loss
    model = no_dropout_net(split)
    batches = make_batches(bad.train, bad, 64, train=True, device='cuda')
    with pytest.raises(NonFiniteLossError, match='epoch 0'):
        fit(model, batches, dataclasses.replace(RECIPE, cuda_graph=True), device='cuda', progress=False)


def test_concurrent_phase1(split, tmp_path):
    "U models trained at once (threads, streams, graphs) train as well as one after the other, and checkpoint."
    recipe = dataclasses.replace(RECIPE, cuda_graph=True, epochs=6, lr_step=4, lr_gamma=0.1)
    run = partial(train_softmax_models, split, 'digits_net', recipe, 2, 'cuda', progress=False)
    seq, conc = run(work_dir=tmp_path / 'seq'), run(work_dir=tmp_path / 'conc', concurrent=True)
    x = split.test_known.x.cuda().float() / 255
    x = (x - torch.tensor(split.mean, device='cuda').view(1, -1, 1, 1)) / torch.tensor(split.std, device='cuda').view(1, -1, 1, 1)
    y = split.test_known.y.cuda()
    for a, b in zip(seq, conc):
        a.eval(); b.eval()
        acc_a, acc_b = ((m(x)[1].argmax(1) == y).float().mean().item() for m in (a, b))
        assert acc_b > 0.9 and abs(acc_a - acc_b) < 0.03, (acc_a, acc_b)
    assert sorted(p.name for p in (tmp_path / 'conc').iterdir()) == ['phase1_model0.pt', 'phase1_model1.pt']


def test_graph_of_a_compiled_model(split):
    "Recipe(compile=True, cuda_graph=True): torch.compile's fused kernels replayed in the one graph of the step."
    recipe = dataclasses.replace(RECIPE, compile=True, cuda_graph=True, optimizer='sgd')
    # Inductor's reductions are not deterministic, so even the same compiled kernels differ a little (measured:
    # 1e-2 of the norm of a BatchNorm bias, whose gradient is a sum of near-cancelling terms)
    assert_same_training(eager_twin(split, recipe), train(split, recipe), tol=3e-2)
    assert_same_training(train(split, dataclasses.replace(recipe, compile=False, cuda_graph=False)), train(split, recipe),
                         tol=5e-2)
