"""Package-level tests of pmal.loss: Eq. 11 point-to-set distance, the Table 3 ablation distance, Eq. 9 and Eq. 10."""
import math

import pytest
import torch
import torch.nn.functional as F

from pmal.loss import point_to_set_distance, nearest_prototype_distance, prototype_loss, pmal_loss

torch.set_num_threads(1)


def literal_distance(z, protos):
    "Eq. 11 written literally, one (sample, class) pair at a time."
    D = z.shape[1]
    out = torch.empty(len(z), len(protos), dtype=z.dtype)
    for b, zb in enumerate(z):
        for k, Pk in enumerate(protos):
            z_att = (Pk @ zb / math.sqrt(D)).softmax(0) @ Pk
            out[b, k] = 1 - F.cosine_similarity(zb, z_att, dim=0)
    return out


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_hand_computed_2d():
    # p1=(1,0), p2=(0,1), D=2: z=(1,0) -> a=(0.66976, 0.33024), cos=0.89690; z=(0,2) -> a=(0.19557, 0.80443), cos=0.97169
    P = torch.tensor([[[1., 0.], [0., 1.]]])
    d = point_to_set_distance(torch.tensor([[1., 0.], [0., 1.], [0., 2.]]), P)[:, 0]
    torch.testing.assert_close(d, torch.tensor([0.10310, 0.10310, 0.02831]), atol=1e-4, rtol=0)


def test_matches_literal_formula(gen):
    z = torch.randn(7, 12, dtype=torch.float64, generator=gen)
    protos = torch.randn(5, 6, 12, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(point_to_set_distance(z, protos), literal_distance(z, protos))


def test_single_prototype_is_cosine_distance(gen):
    z, p = torch.randn(9, 8, generator=gen), torch.randn(4, 1, 8, generator=gen)
    expected = 1 - F.cosine_similarity(z[:, None], p[None, :, 0], dim=-1)
    torch.testing.assert_close(point_to_set_distance(z, p), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(nearest_prototype_distance(z, p), expected, atol=1e-6, rtol=0)


def test_identical_prototypes_equal_one_prototype(gen):
    z, p = torch.randn(9, 8, generator=gen), torch.randn(4, 1, 8, generator=gen)
    torch.testing.assert_close(point_to_set_distance(z, p.expand(4, 10, 8)), point_to_set_distance(z, p),
                               atol=1e-6, rtol=0)


def test_scale_of_z_acts_as_attention_temperature(gen):
    z = torch.randn(3, 8, dtype=torch.float64, generator=gen)
    protos = torch.randn(2, 5, 8, dtype=torch.float64, generator=gen)
    # T = 1: scale invariant (pure cosine)
    torch.testing.assert_close(point_to_set_distance(50 * z, protos[:, :1]), point_to_set_distance(z, protos[:, :1]))
    # large scale -> hard attention on the prototype with the largest dot product
    t_star = torch.einsum('bd,ktd->bkt', z, protos).argmax(-1)
    nearest_dot = protos[torch.arange(2)[None], t_star]                       # B x K x D
    torch.testing.assert_close(point_to_set_distance(1e4 * z, protos),
                               1 - F.cosine_similarity(z[:, None], nearest_dot, dim=-1))
    # small scale -> uniform attention: the mean prototype
    torch.testing.assert_close(point_to_set_distance(1e-7 * z, protos),
                               1 - F.cosine_similarity(z[:, None], protos.mean(1)[None], dim=-1), atol=1e-6, rtol=0)


def test_nearest_prototype_distance_known_values_and_scale_invariance(gen):
    P = torch.tensor([[[1., 0.], [0., 1.]]])
    d = nearest_prototype_distance(torch.tensor([[1., 0.], [1., 1.], [5., 5.]]), P)[:, 0]
    torch.testing.assert_close(d, torch.tensor([0., 1 - 2 ** -0.5, 1 - 2 ** -0.5]), atol=1e-6, rtol=0)
    z, protos = torch.randn(4, 8, generator=gen), torch.randn(3, 5, 8, generator=gen)
    torch.testing.assert_close(nearest_prototype_distance(7 * z, 0.1 * protos), nearest_prototype_distance(z, protos))


def test_rotation_invariance(gen):
    z, protos = torch.randn(4, 8, dtype=torch.float64, generator=gen), torch.randn(3, 5, 8, dtype=torch.float64, generator=gen)
    R = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=gen))[0]
    for fn in (point_to_set_distance, nearest_prototype_distance):
        torch.testing.assert_close(fn(z @ R, protos @ R), fn(z, protos))


def test_gradcheck_distance_float64(gen):
    z = torch.randn(4, 6, dtype=torch.float64, generator=gen).requires_grad_()
    protos = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(point_to_set_distance, (z, protos))


def test_gradcheck_prototype_loss_float64():
    dist = torch.tensor([[0.1, 0.9, 1.2], [0.6, 0.2, 0.4], [0.5, 0.3, 1.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 1])
    assert torch.autograd.gradcheck(lambda d: prototype_loss(d, y), (dist,))


def test_gradcheck_through_distance_into_loss(gen):
    z = torch.randn(5, 6, dtype=torch.float64, generator=gen).requires_grad_()
    protos = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen)
    y = torch.tensor([0, 1, 2, 0, 1])
    # delta large enough that every hinge is active (no kink inside the finite-difference step)
    assert torch.autograd.gradcheck(lambda z: prototype_loss(point_to_set_distance(z, protos), y, delta=3.0), (z,))


def test_zero_embedding_is_finite():
    z = torch.zeros(2, 8, requires_grad=True)
    d = point_to_set_distance(z, torch.randn(3, 4, 8))
    torch.testing.assert_close(d.detach(), torch.ones(2, 3))
    d.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_shapes_imagenet_scale_and_dtypes(gen):
    d = point_to_set_distance(torch.randn(8, 32, generator=gen), torch.randn(1000, 10, 32, generator=gen))
    assert d.shape == (8, 1000) and d.dtype == torch.float32
    assert ((d >= 0) & (d <= 2)).all()
    assert nearest_prototype_distance(torch.randn(8, 32), torch.randn(1000, 10, 32)).shape == (8, 1000)
    assert point_to_set_distance(torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 2, 4, dtype=torch.float64)).dtype == torch.float64
    assert point_to_set_distance(torch.randn(2, 4).half(), torch.randn(3, 2, 4).half()).dtype == torch.float32


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match='same D'):
        point_to_set_distance(torch.randn(2, 8), torch.randn(3, 2, 7))
    with pytest.raises(ValueError, match=r'\(K, T, D\)'):
        nearest_prototype_distance(torch.randn(2, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match='K >= 2'):
        prototype_loss(torch.rand(4, 1), torch.zeros(4, dtype=torch.long))


def test_prototype_loss_known_answers():
    dist = torch.tensor([[0.1, 0.9, 1.2], [0.6, 0.2, 0.4], [0.5, 0.3, 1.0]])
    y = torch.tensor([0, 2, 1])
    # rows: [0.1-0.9+0.5]+ = 0, [0.4-0.2+0.5]+ = 0.7, [0.3-0.5+0.5]+ = 0.3
    torch.testing.assert_close(prototype_loss(dist, y), torch.tensor(1 / 3))
    assert prototype_loss(dist[:1], y[:1]).item() == 0.0                     # margin satisfied
    torch.testing.assert_close(prototype_loss(dist, y, delta=0.0), torch.tensor(0.2 / 3))


def test_pmal_loss_is_ce_plus_weighted_prototype_loss():
    dist = torch.tensor([[0.1, 0.9, 1.2], [0.6, 0.2, 0.4], [0.5, 0.3, 1.0]])
    y = torch.tensor([0, 2, 1])
    logits = torch.tensor([[2., 0., 0.], [0., 0., 0.], [0., 1., 0.]])
    ce = F.cross_entropy(logits, y)
    torch.testing.assert_close(pmal_loss(logits, dist, y), ce + 1 / 3)
    total, parts = pmal_loss(logits, dist, y, lambda_p=0.5, delta=0.0, return_parts=True)
    torch.testing.assert_close(total, ce + 0.5 * 0.2 / 3)
    torch.testing.assert_close(parts['ce'], ce)


def test_training_on_prototype_loss_separates_classes():
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(3, 4, 16, generator=g) * 0.5 + 2 * torch.randn(3, 1, 16, generator=g)
    y = torch.arange(3).repeat_interleave(10)
    emb = torch.nn.Parameter(torch.randn(30, 16, generator=g))
    opt = torch.optim.Adam([emb], lr=0.05)
    for _ in range(200):
        loss = prototype_loss(point_to_set_distance(emb, protos), y)
        opt.zero_grad(); loss.backward(); opt.step()
    assert loss.item() < 1e-6
    assert torch.equal(point_to_set_distance(emb, protos).argmin(1), y)


def test_autocast_does_not_lower_precision(gen):
    z, protos = 30 * torch.randn(8, 16, generator=gen), 30 * torch.randn(4, 5, 16, generator=gen)
    for fn in (point_to_set_distance, nearest_prototype_distance):
        expected = fn(z, protos)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            got = fn(z, protos)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected)
