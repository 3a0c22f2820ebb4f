"Package-level tests of pmal.diversity: Algorithm 1, the Table 4 alternatives, per-class selection."

import pytest
import torch

from pmal.diversity import (DIVERSITY, algorithm1, kmeans_choice, nearest_more_robust, quality_max_probability,
                            quality_probability_variance, random_choice, robustness_order, select_prototypes)


def _toy(n=60, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, K, generator=g), torch.rand(n, generator=g) * 0.5 + 0.5, torch.arange(n) % K


def test_algorithm1_fig3b_order():
    # three peaks on a line: x1 (r=1) at 0, x2 (r=.9) at 3, x3 (r=.88) at 8 -> x1, x3 (d3=5), x2 (d2=2.5)
    pos = torch.tensor([0.0, 0.5, -0.5, 3.0, 3.5, 8.0, 8.5])
    r = torch.tensor([1.0, 0.95, 0.93, 0.9, 0.86, 0.88, 0.8])
    c = torch.stack([pos, torch.zeros(7)], 1)
    assert algorithm1(c, r, 3).tolist() == [0, 5, 3]
    E, J = nearest_more_robust(c, r)
    assert torch.allclose(E[[0, 3, 5]], torch.tensor([9.0, 2.5, 5.0]))
    assert J[0] == -1 and J[3] == 1 and J[5] == 3


def test_algorithm1_matches_bruteforce_definition():
    c, r, _ = _toy(40)
    E, _ = nearest_more_robust(c, r)
    D = torch.cdist(c, c)
    for i in range(40):
        higher = r > r[i]
        want = D[i, higher].min() if higher.any() else D.max()
        assert torch.isclose(E[i], want, atol=1e-5)
    order = algorithm1(c, r, 40)
    assert sorted(order.tolist()) == list(range(40))
    assert (E[order][:-1] >= E[order][1:]).all()
    assert order[0] == r.argmax()


def test_algorithm1_ties_deterministic():
    line = torch.arange(6.).unsqueeze(1)
    assert algorithm1(line, torch.ones(6), 6).tolist() == list(range(6))
    assert robustness_order(torch.tensor([0.5, 0.7, 0.5, 0.7])).tolist() == [1, 3, 0, 2]
    c, r, _ = _toy(30)
    assert torch.equal(algorithm1(c, r, 10), algorithm1(c.clone(), r.clone(), 10))
    assert algorithm1(c, r, 10).dtype == torch.long


def test_algorithm1_fewer_than_T_and_dtype():
    c, r, _ = _toy(4)
    assert sorted(algorithm1(c, r, 10).tolist()) == [0, 1, 2, 3]
    assert torch.equal(algorithm1(c.double(), r.double(), 3), algorithm1(c, r, 3))
    with pytest.raises(ValueError, match='positive'):
        algorithm1(c, r, 0)


@pytest.mark.parametrize('rule', ['random', 'kmeans', 'algorithm1'])
def test_alternatives_T_distinct_right_class(rule):
    c, r, y = _toy(90)
    cand = r > 0.6
    P = select_prototypes(c, r, y, cand, T=5, diversity=rule, seed=1)
    assert P.shape == (3, 5) and P.dtype == torch.long
    for k in range(3):
        assert len(set(P[k].tolist())) == 5
        assert (y[P[k]] == k).all() and cand[P[k]].all()
    assert torch.equal(P, select_prototypes(c, r, y, cand, T=5, diversity=rule, seed=1))


def test_random_and_kmeans_local_level():
    c, r, _ = _toy(20)
    a, b = random_choice(c, r, 5, seed=0), random_choice(c, r, 5, seed=1)
    assert len(set(a.tolist())) == 5 and not torch.equal(a, b)
    k = kmeans_choice(c, r, 5, seed=0)
    assert len(set(k.tolist())) == 5 and torch.equal(k, kmeans_choice(c, r, 5, seed=0))
    assert (r[k][:-1] >= r[k][1:]).all()  # most robust first
    # duplicated points: fewer distinct points than T still gives T distinct samples
    dup = torch.zeros(8, 2)
    assert len(set(kmeans_choice(dup, torch.ones(8), 4).tolist())) == 4
    assert set(DIVERSITY) == {'algorithm1', 'random', 'kmeans', 'top'}
    assert torch.equal(DIVERSITY['top'](c, r, 5), r.argsort(descending=True)[:5])  # Table 3 'no diversity'


def test_fill_from_class_warns_and_fills_by_r():
    c, r, y = _toy(60)
    cand = torch.zeros(60, dtype=torch.bool)
    cand[[0, 3, 1, 4, 7, 10, 13, 16, 2, 5, 8, 11, 14, 17]] = True  # class 0 has 2 candidates (0, 3)
    with pytest.warns(UserWarning, match=r'class\(es\) 0'):
        P = select_prototypes(c, r, y, cand, T=4)
    assert set(P[0, :2].tolist()) == {0, 3}
    rest = torch.tensor([i for i in range(0, 60, 3) if i not in (0, 3)])
    assert P[0, 2:].tolist() == rest[r[rest].argsort(descending=True)[:2]].tolist()
    assert all(cand[P[k]].all() for k in (1, 2))


def test_too_small_class_pads_and_empty_class_errors():
    c, r, y = _toy(12)
    with pytest.warns(UserWarning, match='repeat'):
        P = select_prototypes(c, r, y, torch.ones(12, dtype=torch.bool), T=6)
    assert P.shape == (3, 6) and all(len(set(row.tolist())) == 4 for row in P)
    with pytest.raises(ValueError, match='class 3 has no training sample'):
        select_prototypes(c, r, y, torch.ones(12, dtype=torch.bool), T=2, num_classes=4)


def test_quality_rules():
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.34, 0.33, 0.33]])
    assert torch.allclose(quality_max_probability(p), torch.tensor([0.6, 0.6, 0.34]))
    assert torch.allclose(quality_max_probability(p[None]), quality_max_probability(p))
    same = torch.stack([p, p])
    assert torch.allclose(quality_probability_variance(same), torch.ones(3))
    onehots = torch.stack([torch.eye(3), torch.eye(3).roll(1, 0)])  # every sample: two disagreeing one-hots
    assert torch.allclose(quality_probability_variance(onehots), torch.full((3,), 0.5))
    g = torch.Generator().manual_seed(0)
    mc = torch.rand(20, 50, 4, generator=g).softmax(-1)  # e.g. 20 MC-dropout passes
    q = quality_probability_variance(mc)
    assert ((q > 0) & (q <= 1)).all()
    with pytest.raises(ValueError, match='S >= 2'):
        quality_probability_variance(p[None])


def test_quality_drives_selection():
    # a quality score takes the place of r: candidates are top-quality, Algorithm 1 starts at the best one
    c, _, y = _toy(60)
    probs = torch.rand(60, 3, generator=torch.Generator().manual_seed(2)).softmax(-1)
    q = quality_max_probability(probs)
    cand = torch.zeros(60, dtype=torch.bool)
    for k in range(3):
        cls = torch.nonzero(y == k).flatten()
        cand[cls] = q[cls] > 0.7 * q[cls].max()
    P = select_prototypes(c, q, y, cand, T=3)
    for k in range(3):
        cls = torch.nonzero(y == k).flatten()
        assert P[k, 0] == cls[q[cls].argmax()]


def test_algorithm1_strict_more_robust_known_answer():
    # Algorithm 1 line 5: x_j is "more robust" than x_i only if r(x_j) > r(x_i); equal r does not count.
    # Five candidates on a line (second coordinate 0):
    #   local index   0    1    2    3    4
    #   position      0    1    6    4   10
    #   r            .9   .9   .5   .5   .3
    # E0, E1: nothing strictly more robust -> E = max D = |10 - 0| = 10 (both tied tops, J = -1)
    # E2 (at 6): more robust {0, 1} -> min(6, 5) = 5 (J = 1); candidate 3 has equal r and does not count
    # E3 (at 4): more robust {0, 1} -> min(4, 3) = 3 (J = 1)
    # E4 (at 10): more robust {0, 1, 2, 3} -> nearest is 2 at 6 -> 4 (J = 2)
    # E = (10, 10, 5, 3, 4): order by E, equal E by r then index -> 0, 1, 2, 4, 3; T = 2 -> {0, 1}
    pos = torch.tensor([0., 1., 6., 4., 10.])
    c = torch.stack([pos, torch.zeros(5)], 1)
    r = torch.tensor([0.9, 0.9, 0.5, 0.5, 0.3])
    E, J = nearest_more_robust(c, r)
    assert torch.allclose(E, torch.tensor([10., 10., 5., 3., 4.]))
    assert J.tolist() == [-1, -1, 1, 1, 2]
    assert algorithm1(c, r, 5).tolist() == [0, 1, 2, 4, 3]
    assert algorithm1(c, r, 2).tolist() == [0, 1]
    # the audit's three-point case: two candidates tied at the top, T = 2 -> {0, 1} (not {0, 2})
    c3 = torch.tensor([[0.], [1.], [10.]])
    assert algorithm1(c3, torch.tensor([1., 1., 0.5]), 2).tolist() == [0, 1]


def test_algorithm1_all_equal_r_every_E_is_max_D():
    # no candidate is strictly more robust than another: every E = max D, J = -1, order by index
    line = torch.arange(5.).unsqueeze(1)
    E, J = nearest_more_robust(line, torch.ones(5))
    assert E.tolist() == [4.] * 5 and J.tolist() == [-1] * 5
    assert algorithm1(line, torch.ones(5), 3).tolist() == [0, 1, 2]
