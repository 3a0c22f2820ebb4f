"""Package-level tests of pmal.baselines: the GCPL / RPL / ARPL formulas, gradients, training by pmal.train.fit,
and building each by name through the method registry."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pmal.baselines import GCPLCriterion, RPLCriterion, ARPLCriterion, SoftmaxCriterion, squared_distances
from pmal.methods import Method, METHODS, create_criterion, get_method, register_method

torch.set_num_threads(1)


class Identity(nn.Module):
    "A stand-in model whose embedding is its input."
    def forward(self, x): return x, None


def set_points(param, values):
    with torch.no_grad(): param.copy_(torch.as_tensor(values, dtype=param.dtype).reshape(param.shape))


Z = torch.tensor([[1., 2.]])        # squared distances to (0,0) and (1,0): 5 and 4
POINTS = [[0., 0.], [1., 0.]]


def test_squared_distances_matches_cdist():
    g = torch.Generator().manual_seed(0)
    z, p = torch.randn(7, 5, dtype=torch.float64, generator=g), torch.randn(3, 2, 5, dtype=torch.float64, generator=g)
    expected = torch.cdist(z, p.reshape(-1, 5)).pow(2).reshape(7, 3, 2)
    torch.testing.assert_close(squared_distances(z, p), expected)
    assert (squared_distances(p[0], p[0]) >= 0).all()


def reference_gcpl(z, centers, y, weight_pl=0.1, temp=1.0):
    "The reference GCPL (iCGY96/ARPL loss/GCPLoss.py with loss/Dist.py, one centre per class), written out: (scores, loss)."
    dist = torch.cdist(z, centers).pow(2) / z.shape[1]                     # Dist: ||z - m_k||^2 / D
    return -dist, F.cross_entropy(-dist / temp, y) + weight_pl * F.mse_loss(z, centers[y]) / 2


def test_gcpl_reference_defaults():
    crit = GCPLCriterion(3, 4)
    assert (crit.lambda_, crit.temperature) == (0.1, 1.0)                  # weight_pl, temp of the reference


def test_gcpl_formula_by_hand():
    # D = 3; squared distances: z_0 -> (5, 4), z_1 -> (9, 10); over D: (5/3, 4/3), (3, 10/3); labels (1, 0)
    crit = GCPLCriterion(2, 3)
    set_points(crit.prototypes, [[0., 0., 0.], [1., 0., 0.]])
    z, y = torch.tensor([[1., 2., 0.], [0., 0., 3.]]), torch.tensor([1, 0])
    loss, logits = crit(Identity(), z, y)
    torch.testing.assert_close(logits, torch.tensor([[-5 / 3, -4 / 3], [-3., -10 / 3]]))
    torch.testing.assert_close(crit.scores(z), logits)
    # CE of both rows = log(1 + e^(-1/3)); PL = mse over the B x D entries of z - m_y, halved: (4 + 9) / 6 / 2
    torch.testing.assert_close(loss, torch.tensor(math.log(1 + math.exp(-1 / 3)) + 0.1 * 13 / 12))
    crit.temperature = 2.0                                                  # CE on logits / temp; scores unchanged
    loss2, logits2 = crit(Identity(), z, y)
    torch.testing.assert_close(loss2, torch.tensor(math.log(1 + math.exp(-1 / 6)) + 0.1 * 13 / 12))
    torch.testing.assert_close(logits2, logits)


@pytest.mark.parametrize('lambda_,temperature', [(0.1, 1.0), (0.5, 0.5)])
def test_gcpl_matches_reference_formula(lambda_, temperature):
    g = torch.Generator().manual_seed(0)
    z, centers = torch.randn(9, 6, dtype=torch.float64, generator=g), torch.randn(4, 6, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3])
    crit = GCPLCriterion(4, 6, lambda_=lambda_, temperature=temperature).double()
    set_points(crit.prototypes, centers)
    loss, logits = crit(Identity(), z, y)
    ref_scores, ref_loss = reference_gcpl(z, centers, y, lambda_, temperature)
    torch.testing.assert_close(logits, ref_scores)
    torch.testing.assert_close(loss, ref_loss)


def test_gcpl_nearest_prototype_of_a_class_counts():
    crit = GCPLCriterion(2, 2, prototypes_per_class=2)
    set_points(crit.prototypes, [[0., 0.], [1., 2.5], [1., 0.], [5., 5.]])
    torch.testing.assert_close(crit.scores(Z), torch.tensor([[-0.125, -2.0]]))   # nearest of each class, over D = 2
    loss, _ = crit(Identity(), Z, torch.tensor([0]))
    torch.testing.assert_close(loss, torch.tensor(math.log(1 + math.exp(-1.875)) + 0.1 * 0.25 / 4))
    loss.backward()
    g = crit.prototypes.grad
    assert g[0, 0].abs().sum() == 0 and g[0, 1].abs().sum() > 0            # only the nearest prototype of class 0 moves


def test_rejection_rules_follow_reference_test_code():
    # core/test.py takes the max of what the criterion returns without labels: softmax(-dist) for GCPL,
    # softmax(dist) for RPL, the raw logits d_e - z.P for ARPL.
    assert tuple(get_method(m).rule for m in ('gcpl', 'rpl', 'arpl')) == ('msp', 'msp', 'mls')
    assert (get_method('softmax').rule, get_method('mls').rule) == ('msp', 'mls')


def test_rpl_formula_and_radius_gradient():
    crit = RPLCriterion(2, 2)
    set_points(crit.points, POINTS)
    loss, logits = crit(Identity(), Z, torch.tensor([0]))
    torch.testing.assert_close(logits, torch.tensor([[2.5, 2.0]]))
    torch.testing.assert_close(loss, torch.tensor(math.log(1 + math.exp(-0.5)) + 0.1 * 2.5 ** 2))
    loss.backward()
    torch.testing.assert_close(crit.radius.grad, torch.tensor([-0.1 * 2 * 2.5]))


def test_arpl_formula_margin_and_radius_gradient():
    crit = ARPLCriterion(2, 2)
    set_points(crit.points, POINTS)
    loss, logits = crit(Identity(), Z, torch.tensor([0]))
    torch.testing.assert_close(logits, torch.tensor([[2.5, 1.0]]))          # d_e - z.P = (2.5 - 0, 2 - 1)
    torch.testing.assert_close(loss, torch.tensor(math.log(1 + math.exp(-1.5)) + 0.1 * 3.5))
    loss.backward()
    torch.testing.assert_close(crit.radius.grad, torch.tensor([-0.1]))
    with torch.no_grad(): crit.radius.fill_(10.)                            # d_e <= R - 1: margin term is zero
    torch.testing.assert_close(crit(Identity(), Z, torch.tensor([0]))[0], torch.tensor(math.log(1 + math.exp(-1.5))))


@pytest.mark.parametrize('cls', [GCPLCriterion, RPLCriterion, ARPLCriterion])
def test_gradients_reach_points_and_model(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    wrapped = lambda x: (model(x), None)
    crit = cls(5, 3)
    x, y = torch.randn(16, 4), torch.arange(16) % 5
    loss, logits = crit(wrapped, x, y)
    assert logits.shape == (16, 5) and loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for p in list(crit.parameters()) + list(model.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize('cls', [GCPLCriterion, RPLCriterion, ARPLCriterion])
def test_gradcheck_float64(cls):
    torch.manual_seed(0)
    crit = cls(3, 4).double()
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1])
    assert torch.autograd.gradcheck(lambda z: crit(Identity(), z, y)[0], (z,))
    assert torch.autograd.gradcheck(crit.scores, (z,))


@pytest.mark.parametrize('cls', [GCPLCriterion, RPLCriterion, ARPLCriterion])
def test_scales_and_dtypes(cls):
    z = torch.randn(4, 32)
    assert cls(1000, 32).scores(z).shape == (4, 1000)
    assert cls(3, 32).scores(z.half()).dtype == torch.float32
    assert cls(3, 32).double().scores(z.double()).dtype == torch.float64
    with pytest.raises(ValueError, match='num_classes >= 2'):
        cls(1, 32)


def test_registry():
    assert isinstance(create_criterion('softmax', 6, 32), SoftmaxCriterion)
    assert isinstance(create_criterion('mls', 6, 32), SoftmaxCriterion)
    crit = create_criterion('rpl', 6, 32, lambda_=0.5, points_per_class=2)
    assert isinstance(crit, RPLCriterion) and crit.lambda_ == 0.5 and crit.points.shape == (6, 2, 32)
    assert isinstance(create_criterion('arpl', 6, 32), ARPLCriterion)
    assert isinstance(create_criterion('gcpl', 6, 32), GCPLCriterion)
    with pytest.raises(ValueError, match="method must be one of \\('pmal', 'softmax'"):
        create_criterion('cpn', 6, 32)
    with pytest.raises(TypeError):
        create_criterion('gcpl', 6, 32, not_an_option=1)


def test_register_extension_point():
    try:
        register_method(Method('toy', lambda k, d, **kw: GCPLCriterion(k, d, **kw), rule='msp', own_scores=True))
        assert isinstance(create_criterion('toy', 3, 8, temperature=2.0), GCPLCriterion)
        assert get_method('toy').rule == 'msp' and get_method('toy').headline == 'toy'
        with pytest.raises(ValueError, match="rule must be one of"):
            register_method(Method('toy2', GCPLCriterion, rule='energy'))
        with pytest.raises(ValueError, match="registered already"):
            register_method(Method('toy', GCPLCriterion, rule='mls'))
    finally:
        METHODS.pop('toy', None)
    assert 'toy2' not in METHODS and get_method('softmax').rule == 'msp'


@pytest.mark.parametrize('method', ['gcpl', 'rpl', 'arpl'])
def test_fit_trains_criterion_parameters(method):
    from pmal.batches import make_batches
    from pmal.data import load_openset
    from pmal.models import digits_net
    from pmal.train import Recipe, fit, seed_everything
    seed_everything(0)
    split = load_openset('digits', 0)
    model = digits_net(split.num_classes, split.image_shape[0])
    crit = create_criterion(method, split.num_classes, model.embed_dim)
    before = {k: v.detach().clone() for k, v in crit.state_dict().items()}
    recipe = Recipe(epochs=2, lr=0.01, lr_step=10, batch_size=128, seed=0)
    fit(model, make_batches(split.train, split, recipe.batch_size, train=True, device='cpu', seed=0), recipe, crit,
        progress=False)
    for k, v in crit.state_dict().items():
        assert not torch.equal(v, before[k]), f"{method}: {k} was not trained"


def test_checkpoint_holds_criterion_parameters(tmp_path):
    from pmal.batches import make_batches
    from pmal.data import load_openset
    from pmal.models import digits_net
    from pmal.train import Recipe, fit
    split = load_openset('digits', 0)
    model = digits_net(split.num_classes, split.image_shape[0])
    crit = create_criterion('arpl', split.num_classes, model.embed_dim)
    recipe = Recipe(epochs=1, batch_size=256, seed=0)
    fit(model, make_batches(split.train, split, recipe.batch_size, train=True, device='cpu', seed=0), recipe, crit,
        checkpoint=tmp_path / 'arpl.pt', progress=False)
    saved = torch.load(tmp_path / 'arpl.pt', weights_only=True)['criterion']
    torch.testing.assert_close(saved['points'], crit.points.detach())
    torch.testing.assert_close(saved['radius'], crit.radius.detach())


@pytest.mark.parametrize('cls', [GCPLCriterion, RPLCriterion, ARPLCriterion])
def test_autocast_does_not_lower_precision(cls):
    torch.manual_seed(0)
    crit, z = cls(4, 16), torch.randn(8, 16) * 30
    expected = crit.scores(z)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = crit.scores(z)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
