"Package-level tests of pmal.robustness: Eq. 7 in row blocks, scalings, landmarks, the candidate rule."
import math

import pytest
import torch
from scipy.stats import spearmanr

from pmal.mahalanobis import centred_logits
from pmal.robustness import (SCALINGS, candidate_mask, model_pairs, reference_indices, rms_distance, scaled_gap,
                             topology_distance, topology_robustness)
from pmal.uncertainty import simulate_embeddings

torch.set_num_threads(1)


def naive_gap(centred, reference=None):
    "Both full distance matrices in memory, then the row norms of their differences (P x N)."
    refs = centred if reference is None else [c[reference] for c in centred]
    D = [torch.cdist(c, rc, compute_mode='donot_use_mm_for_euclid_dist') for c, rc in zip(centred, refs)]
    return torch.stack([(D[u] - D[v]).norm(dim=1) for u, v in model_pairs(len(centred))])


def naive_robustness(centred, scaling):
    "Eq. 7 from the full matrices, with the module's scalings."
    if 'rms' in scaling: centred = [c / rms_distance(c, c) for c in centred]
    return torch.exp(-scaled_gap(naive_gap(centred), scaling, len(centred[0]))).clamp_min(
        torch.finfo(centred[0].dtype).tiny).mean(0)


@pytest.fixture
def spaces():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(150, 5, generator=g, dtype=torch.float64)
    return [base * (1 + 0.2 * u) + 0.5 * torch.randn(150, 5, generator=g, dtype=torch.float64) for u in range(3)]


@pytest.mark.parametrize('block_size', [1, 13, 149, 150, 151, None])
def test_blocked_equals_naive(spaces, block_size):
    torch.testing.assert_close(topology_distance(spaces, block_size=block_size), naive_gap(spaces), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(topology_distance(spaces[:2], block_size=block_size), naive_gap(spaces[:2]),
                               rtol=1e-10, atol=1e-10)


def test_worker_threads_equal_naive_and_restore_threads(spaces):
    "On the CPU with several torch threads the blocks go to worker threads; same result, thread count restored."
    torch.set_num_threads(2)
    try:
        torch.testing.assert_close(topology_distance(spaces, block_size=9), naive_gap(spaces), rtol=1e-10, atol=1e-10)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize('scaling', SCALINGS)
def test_robustness_equals_naive(spaces, scaling):
    torch.testing.assert_close(topology_robustness(spaces[:2], scaling=scaling, block_size=16),
                               naive_robustness(spaces[:2], scaling), rtol=1e-9, atol=1e-12)


def test_float32_close_to_float64(spaces):
    r64 = topology_robustness(spaces[:2])
    r32 = topology_robustness([c.float() for c in spaces[:2]])
    assert r32.dtype == torch.float32
    torch.testing.assert_close(r32.double(), r64, rtol=1e-4, atol=1e-5)


def test_landmark_subset_matches_naive_columns(spaces):
    idx = reference_indices(150, 40, seed=3)
    assert idx is not None and len(idx) == 40 and len(set(idx.tolist())) == 40
    torch.testing.assert_close(topology_distance(spaces, reference=idx), naive_gap(spaces, idx), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(topology_distance(spaces, reference=idx, block_size=7), naive_gap(spaces, idx),
                               rtol=1e-10, atol=1e-10)


def test_landmarks_all_samples_equal_exact(spaces):
    exact = topology_robustness(spaces)
    torch.testing.assert_close(topology_robustness(spaces, landmarks=150), exact, rtol=0, atol=0)
    torch.testing.assert_close(topology_robustness(spaces, landmarks=10_000), exact, rtol=0, atol=0)
    shuffled = torch.randperm(150, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(topology_robustness(spaces, landmarks=shuffled), exact, rtol=1e-9, atol=1e-12)


def test_landmarks_seeded(spaces):
    a = topology_robustness(spaces[:2], landmarks=30, seed=5)
    torch.testing.assert_close(topology_robustness(spaces[:2], landmarks=30, seed=5), a, rtol=0, atol=0)
    assert not torch.equal(topology_robustness(spaces[:2], landmarks=30, seed=6), a)


@pytest.mark.parametrize('scaling', SCALINGS)
def test_range_and_identical_spaces(spaces, scaling):
    r = topology_robustness([100 * c.float() for c in spaces[:2]], scaling=scaling)  # 'none' underflows here
    assert r.shape == (150,) and torch.isfinite(r).all() and (r > 0).all() and (r <= 1).all()
    torch.testing.assert_close(topology_robustness([spaces[0], spaces[0].clone()], scaling=scaling),
                               torch.ones(150, dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize('scaling', SCALINGS)
def test_invariances(spaces, scaling):
    g = torch.Generator().manual_seed(2)
    r = topology_robustness(spaces[:2], scaling=scaling)
    perm = torch.randperm(150, generator=g)
    torch.testing.assert_close(topology_robustness([c[perm] for c in spaces[:2]], scaling=scaling), r[perm],
                               rtol=1e-9, atol=1e-12)
    Q = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
    torch.testing.assert_close(topology_robustness([spaces[0] @ Q - 3, spaces[1]], scaling=scaling), r,
                               rtol=1e-9, atol=1e-12)
    if scaling not in ('none', 'sqrt_n'):
        torch.testing.assert_close(topology_robustness([4 * c for c in spaces[:2]], scaling=scaling), r,
                                   rtol=1e-9, atol=1e-12)
    if 'rms' in scaling:
        torch.testing.assert_close(topology_robustness([spaces[0], 0.1 * spaces[1]], scaling=scaling), r,
                                   rtol=1e-9, atol=1e-12)


def test_sqrt_n_and_median_known_answers():
    c1, c2 = torch.tensor([[0.], [1.], [3.]]), torch.tensor([[0.], [1.], [4.]])
    torch.testing.assert_close(topology_distance([c1, c2]), torch.tensor([[1., 1., 2 ** .5]]))
    gaps = torch.tensor([1., 1., 2 ** .5])
    torch.testing.assert_close(topology_robustness([c1, c2], 'none'), torch.exp(-gaps))
    torch.testing.assert_close(topology_robustness([c1, c2], 'sqrt_n'), torch.exp(-gaps / 3 ** .5))
    torch.testing.assert_close(topology_robustness([c1, c2], 'median'), torch.exp(-gaps))
    torch.testing.assert_close(topology_robustness([c1, torch.tensor([[0.], [2.], [3.]])], 'rms_excess'),
                               torch.tensor([1., math.exp(-3), 1.]))


def test_rms_excess_best_sample_is_one(spaces):
    r = topology_robustness(spaces[:2], scaling='rms_excess')
    assert r.max() == 1.0 and (r < 1).sum() == 149


def test_u3_averages_pairs(spaces):
    pairs = torch.stack([topology_robustness([spaces[u], spaces[v]]) for u, v in model_pairs(3)])
    torch.testing.assert_close(topology_robustness(spaces), pairs.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(topology_robustness(torch.stack(spaces)), pairs.mean(0), rtol=1e-12, atol=1e-12)
    assert topology_distance(spaces).shape == (3, 150)


def test_candidate_mask_known_answer():
    r = torch.tensor([1., 0.8, 0.6, 0.2, 0.1, 0.15, 0.5])
    labels = torch.tensor([0, 0, 0, 5, 5, 5, -2])  # any integer labels
    assert candidate_mask(r, labels).tolist() == [True, True, False, True, False, True, True]
    assert candidate_mask(r, labels, eps=0.0).all()
    assert not candidate_mask(r, labels, eps=1.0).any()  # strictly above eps * max
    assert candidate_mask(r, labels, eps=0.5).tolist() == [True, True, True, True, False, True, True]
    assert candidate_mask(r.double(), labels.tolist()).dtype == torch.bool


def test_candidate_mask_every_class_keeps_its_best(spaces):
    r = topology_robustness(spaces[:2])
    labels = torch.arange(150) % 7
    mask = candidate_mask(r, labels, eps=0.99)
    assert torch.equal(torch.bincount(labels[mask], minlength=7) >= 1, torch.ones(7, dtype=torch.bool))


def test_error_messages(spaces):
    a, b = spaces[0], spaces[1]
    with pytest.raises(ValueError, match='U >= 2'): topology_robustness([a])
    with pytest.raises(ValueError, match='same N x K shape'): topology_robustness([a, b[:100]])
    with pytest.raises(ValueError, match='same N x K shape'): topology_robustness([a, b[:, :4]])
    with pytest.raises(ValueError, match='N x K centred logits'): topology_robustness([a, b.flatten()])
    with pytest.raises(ValueError, match='scaling must be one of'): topology_robustness([a, b], scaling='sqrt')
    with pytest.raises(ValueError, match='block_size'): topology_robustness([a, b], block_size=0)
    with pytest.raises(ValueError, match='landmarks'): topology_robustness([a, b], landmarks=-3)
    with pytest.raises(ValueError, match=r'\[0, 150\)'): topology_robustness([a, b], landmarks=torch.tensor([3, 150]))
    with pytest.raises(ValueError, match='same length'): candidate_mask(torch.rand(4), torch.zeros(5))
    with pytest.raises(ValueError, match='eps'): candidate_mask(torch.rand(4), torch.zeros(4), eps=-0.1)


def test_dtypes():
    g = torch.Generator().manual_seed(0)
    c = [torch.randn(40, 3, generator=g) for _ in range(2)]
    assert topology_robustness(c).dtype == torch.float32
    assert topology_robustness([x.double() for x in c]).dtype == torch.float64
    assert topology_robustness([x.half() for x in c]).dtype == torch.float32  # half is computed in float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
def test_cuda_matches_cpu(spaces):
    cpu = topology_robustness([c.float() for c in spaces], block_size=32)
    gpu = topology_robustness([c.float().cuda() for c in spaces], block_size=32)
    assert gpu.device.type == 'cuda'
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-6)


def test_property3_in_the_simulator():
    "r falls as the data uncertainty sigma grows (seeded), and candidates are the cleaner samples."
    sim = simulate_embeddings(seed=0)
    c = [centred_logits(z, W) for z, W in zip(sim.z, sim.weights)]
    r = topology_robustness(c)
    assert spearmanr(sim.sigma, r)[0] < -0.5
    cand = candidate_mask(r, sim.labels)
    assert sim.sigma[cand].mean() < sim.sigma[~cand].mean()


def test_per_space_normalisation_changes_the_order_of_r():
    # K = 1; space 1 at 0, 1, 3 and space 2 at 0, 2, 7 (a larger logit scale, ~2.4x).
    # Literal gaps ||t1 - t2||: (0,1,4) -> sqrt 17, (1,0,3) -> sqrt 10, (4,3,0) -> 5: most robust 1, 0, 2.
    # Each space divided by its RMS distance (sqrt(28/9), sqrt(156/9)) first: gaps ~(0.0887, 0.1095, 0.0698),
    # most robust 2, 0, 1 -- the reverse. 'median', 'sqrt_n', 'none' divide every gap of the pair by one number.
    c1 = torch.tensor([[0.], [1.], [3.]], dtype=torch.float64)
    c2 = torch.tensor([[0.], [2.], [7.]], dtype=torch.float64)
    gap = topology_distance([c1, c2])[0]
    assert torch.allclose(gap, torch.tensor([17 ** .5, 10 ** .5, 5.], dtype=torch.float64))
    s1, s2 = (28 / 9) ** .5, (156 / 9) ** .5
    assert torch.allclose(rms_distance(c1, c1), torch.tensor(s1, dtype=torch.float64))
    assert torch.allclose(rms_distance(c2, c2), torch.tensor(s2, dtype=torch.float64))
    normalised = topology_distance([c1 / s1, c2 / s2])[0]
    assert normalised.argsort().tolist() == [2, 0, 1]
    for sc in ('median', 'sqrt_n', 'none'):
        r = topology_robustness([c1, c2], scaling=sc)
        assert r.argsort(descending=True).tolist() == [1, 0, 2], sc
        assert spearmanr(-gap, r)[0] == pytest.approx(1.0)
    for sc in ('rms_excess', 'rms_median', 'sqrt_n_rms'):
        r = topology_robustness([c1, c2], scaling=sc)
        assert r.argsort(descending=True).tolist() == [2, 0, 1], sc
        assert spearmanr(-gap, r)[0] == pytest.approx(-1.0)
    # rms_excess: excesses (0.0189, 0.0397, 0), median 0.0189 -> r = (e^-1, e^-2.10, 1)
    e = normalised - normalised.min()
    assert torch.allclose(topology_robustness([c1, c2]), torch.exp(-e / e.median()))


def test_scale_only_scalings_keep_the_literal_order_in_the_simulator():
    # heads with their own logit scales: rms_excess ranks by the normalised gap, median / sqrt_n by the literal one
    sim = simulate_embeddings(seed=3)
    c = [centred_logits(z, W).double() for z, W in zip(sim.z, sim.weights)]
    gap = topology_distance(c)[0]
    for sc in ('median', 'sqrt_n'):
        assert spearmanr(-gap, topology_robustness(c, scaling=sc))[0] == pytest.approx(1.0)
    assert spearmanr(-gap, topology_robustness(c, scaling='rms_excess'))[0] < 0.9
