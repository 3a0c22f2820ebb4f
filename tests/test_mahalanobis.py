"Package-level tests of pmal.mahalanobis: centred weights and logits, d_M in two forms."
import pytest
import torch

from pmal.mahalanobis import centred_logits, centred_weights, mahalanobis_distance, mahalanobis_distance_explicit

torch.set_num_threads(1)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_known_answer():
    W = torch.tensor([[1., 0.], [0., 1.], [-1., -1.]])
    z = torch.tensor([[1., 0.], [1., 1.], [0., 0.]])
    assert torch.equal(centred_weights(W), W.T)
    s2, s6 = 2 ** .5, 6 ** .5
    expected = torch.tensor([[0, s2, s2], [s2, 0, s6], [s2, s6, 0]])
    torch.testing.assert_close(mahalanobis_distance(z, z, W), expected)
    torch.testing.assert_close(mahalanobis_distance_explicit(z, z, W), expected)


def test_centred_logits_are_logits_minus_class_mean(gen):
    W, z = torch.randn(6, 9, generator=gen), torch.randn(5, 9, generator=gen)
    logits = z @ W.T
    torch.testing.assert_close(centred_logits(z, W), logits - logits.mean(1, keepdim=True))
    torch.testing.assert_close(centred_logits(z, W).sum(1), torch.zeros(5), atol=1e-5, rtol=0)


def test_two_forms_agree(gen):
    W = torch.randn(10, 32, generator=gen)
    z1, z2 = torch.randn(25, 32, generator=gen, dtype=torch.float64), torch.randn(17, 32, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(mahalanobis_distance(z1, z2, W), mahalanobis_distance_explicit(z1, z2, W))
    torch.testing.assert_close(mahalanobis_distance(z1.float(), z2.float(), W, exact=False),
                               mahalanobis_distance_explicit(z1.float(), z2.float(), W), rtol=1e-3, atol=1e-3)


def test_invariances(gen):
    W, z = torch.randn(4, 8, generator=gen, dtype=torch.float64), torch.randn(12, 8, generator=gen, dtype=torch.float64)
    D = mahalanobis_distance(z, z, W)
    assert torch.equal(D.diagonal(), torch.zeros(12, dtype=torch.float64))
    torch.testing.assert_close(D, D.T)
    shift = torch.randn(1, 8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(mahalanobis_distance(z, z, W + shift), D)  # a common class-weight shift: same softmax
    torch.testing.assert_close(mahalanobis_distance(z + shift, z + shift, W), D)  # translation of the embedding
    null = torch.linalg.svd(centred_weights(W).T).Vh[-1]  # a direction the classifier ignores
    torch.testing.assert_close(mahalanobis_distance(z + 5 * null, z, W).diagonal(), torch.zeros(12, dtype=torch.float64),
                               atol=1e-9, rtol=0)


def test_dtype_and_errors(gen):
    W = torch.randn(3, 4, generator=gen)
    assert mahalanobis_distance(torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4), W).dtype == torch.float64
    with pytest.raises(ValueError, match='D = 4'): centred_logits(torch.zeros(2, 5), W)
    with pytest.raises(ValueError, match='K x D'): centred_weights(torch.zeros(4))
    with pytest.raises(ValueError, match='K >= 2'): centred_weights(torch.zeros(1, 4))
    with pytest.raises(ValueError, match='D = 4'): mahalanobis_distance_explicit(torch.zeros(2, 4), torch.zeros(2, 3), W)
