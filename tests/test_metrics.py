"""Property and validation tests for pmal.metrics (the known answers live in nbs/03_metrics.ipynb)."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from pmal.metrics import (accuracy, auroc, fpr_at_tpr, threshold_at_tpr, oscr, oscr_curve, openset_metrics,
                          summarize, format_mean_std)

SEEDS = range(12)


def random_case(seed, ties=False):
    "Known/unknown scores, correctness of the knowns; `ties` rounds scores to few values."
    rng = np.random.default_rng(seed)
    nk, nu = rng.integers(1, 60, size=2)
    sk, su = rng.normal(1.0, 1.0, nk), rng.normal(0.0, 1.0, nu)
    if ties: sk, su = np.round(sk * 2) / 2, np.round(su * 2) / 2
    correct = rng.random(nk) < 0.8
    return sk, correct, su


def brute_auroc(sk, su):
    "Pair counting: P(known > unknown) + 1/2 P(tie)."
    d = sk[:, None] - su[None, :]
    return ((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size


def brute_oscr(sk, correct, su):
    "OSCR straight from the definition: one threshold per distinct score, trapezoid area."
    fpr, ccr = [0.0], [0.0]
    for t in np.unique(np.r_[sk, su])[::-1]:
        ccr.append(np.sum(correct & (sk >= t)) / len(sk))
        fpr.append(np.sum(su >= t) / len(su))
    fpr, ccr = np.array(fpr), np.array(ccr)
    return float(np.sum(np.diff(fpr) * (ccr[1:] + ccr[:-1]) / 2))


@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('seed', SEEDS)
def test_against_definitions(seed, ties):
    sk, correct, su = random_case(seed, ties)
    assert auroc(sk, su) == pytest.approx(brute_auroc(sk, su), abs=1e-12)
    assert oscr(sk, correct, su) == pytest.approx(brute_oscr(sk, correct, su), abs=1e-12)


@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('seed', SEEDS)
def test_oscr_bounds(seed, ties):
    sk, correct, su = random_case(seed, ties)
    acc, a, o = correct.mean(), auroc(sk, su), oscr(sk, correct, su)
    assert 0 <= o <= acc + 1e-12
    assert o <= a + 1e-12  # CCR(t) <= TPR(t) at every threshold
    fpr, ccr = oscr_curve(sk, correct, su)
    assert (fpr[0], ccr[0]) == (0.0, 0.0)
    assert fpr[-1] == 1.0 and ccr[-1] == pytest.approx(acc)  # ends at (1, ACC): no forced CCR = 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(ccr) >= 0)
    assert len(fpr) == len(np.unique(np.r_[sk, su])) + 1  # ties are one step


@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('seed', SEEDS)
def test_oscr_equals_auroc_when_all_correct(seed, ties):
    sk, _, su = random_case(seed, ties)
    assert oscr(sk, np.ones(len(sk), bool), su) == pytest.approx(auroc(sk, su), abs=1e-12)


MONOTONE = [lambda s: 3 * s - 7, np.exp, lambda s: s ** 3, np.arctan, lambda s: 1 / (1 + np.exp(-s))]


@pytest.mark.parametrize('f', MONOTONE)
@pytest.mark.parametrize('seed', range(4))
def test_invariant_to_monotone_transforms(seed, f):
    sk, correct, su = random_case(seed, ties=True)
    assert auroc(f(sk), f(su)) == pytest.approx(auroc(sk, su), abs=1e-12)
    assert oscr(f(sk), correct, f(su)) == pytest.approx(oscr(sk, correct, su), abs=1e-12)
    assert fpr_at_tpr(f(sk), f(su)) == pytest.approx(fpr_at_tpr(sk, su), abs=1e-12)


@pytest.mark.parametrize('seed', SEEDS)
def test_reversed_orientation(seed):
    sk, _, su = random_case(seed, ties=True)
    assert auroc(sk, su) + auroc(su, sk) == pytest.approx(1.0)
    assert auroc(-su, -sk) == pytest.approx(auroc(sk, su))


@pytest.mark.parametrize('tpr', [0.5, 0.8, 0.9, 0.95, 1.0])
@pytest.mark.parametrize('seed', SEEDS)
def test_fpr_at_tpr_is_first_roc_point_reaching_tpr(seed, tpr):
    sk, _, su = random_case(seed, ties=seed % 2 == 0)
    fprs, tprs, _ = roc_curve(np.r_[np.ones(len(sk)), np.zeros(len(su))], np.r_[sk, su], drop_intermediate=False)
    expected = fprs[np.argmax(tprs >= tpr - 1e-12)]
    assert fpr_at_tpr(sk, su, tpr) == pytest.approx(expected, abs=1e-12)
    t = threshold_at_tpr(sk, tpr)
    assert np.mean(sk >= t) >= tpr - 1e-12  # accepts at least the target fraction of knowns
    assert np.mean(sk > t) < tpr  # and t is the highest such threshold


def test_perfect_separation():
    sk, su = np.array([5., 4., 3., 2.]), np.array([1., 0.])
    correct = np.array([True, True, False, True])
    assert auroc(sk, su) == 1.0 and fpr_at_tpr(sk, su) == 0.0
    assert oscr(sk, correct, su) == pytest.approx(0.75)


def test_torch_dtypes_and_numpy_agree():
    sk, correct, su = random_case(3, ties=True)  # multiples of 0.5: exact in half precision
    ref = (auroc(sk, su), oscr(sk, correct, su), fpr_at_tpr(sk, su))
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        tk, tu = torch.tensor(sk, dtype=dt), torch.tensor(su, dtype=dt)
        got = (auroc(tk, tu), oscr(tk, torch.tensor(correct), tu), fpr_at_tpr(tk, tu))
        assert got == pytest.approx(ref, abs=1e-12)
        assert all(type(v) is float for v in got)


def test_requires_grad_tensors_accepted():
    sk = torch.tensor([0.9, 0.8, 0.4], requires_grad=True)
    assert auroc(sk, torch.tensor([0.6, 0.3])) == pytest.approx(5 / 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
def test_cuda_tensors():
    sk, correct, su = random_case(5)
    dev = lambda a: torch.tensor(a, device='cuda')
    assert oscr(dev(sk), dev(correct), dev(su)) == pytest.approx(oscr(sk, correct, su), abs=1e-6)


def test_openset_metrics_consistent():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 50)
    pred = np.where(rng.random(50) < 0.7, y, (y + 1) % 4)
    sk, su = rng.normal(1, 1, 50), rng.normal(0, 1, 30)
    m = openset_metrics(torch.tensor(pred), torch.tensor(y), torch.tensor(sk), su)
    assert list(m) == ['acc', 'auroc', 'oscr', 'fpr95']
    assert m == pytest.approx(dict(acc=accuracy(pred, y), auroc=auroc(sk, su), oscr=oscr(sk, pred == y, su),
                                   fpr95=fpr_at_tpr(sk, su)))


# ---------------------------------------------------------------- input validation

@pytest.mark.parametrize('call', [
    lambda: auroc([], [0.1, 0.2]),
    lambda: auroc([0.1, 0.2], []),
    lambda: fpr_at_tpr([], [0.1]),
    lambda: fpr_at_tpr([0.1], np.array([])),
    lambda: oscr(torch.tensor([]), [], [0.1]),
    lambda: oscr([0.1], [True], torch.empty(0)),
    lambda: accuracy([], []),
    lambda: openset_metrics([], [], [], [0.1]),
])
def test_empty_inputs_raise(call):
    with pytest.raises(ValueError, match='empty'):
        call()


@pytest.mark.parametrize('call', [
    lambda: accuracy([0, 1, 2], [0, 1]),
    lambda: oscr([0.1, 0.2, 0.3], [True, False], [0.1]),
    lambda: oscr_curve([0.1, 0.2], [True, False, True], [0.1]),
    lambda: openset_metrics([0, 1], [0, 1, 1], [0.1, 0.2], [0.1]),
    lambda: openset_metrics([0, 1], [0, 1], [0.1, 0.2, 0.3], [0.1]),
])
def test_mismatched_lengths_raise(call):
    with pytest.raises(ValueError, match='same samples'):
        call()


def test_other_bad_inputs_raise():
    with pytest.raises(ValueError, match='1-D'):
        auroc(torch.rand(5, 3), torch.rand(4))  # logits passed instead of scores
    with pytest.raises(ValueError, match='NaN'):
        oscr([0.1, float('nan')], [True, True], [0.2])
    with pytest.raises(ValueError, match='NaN'):
        auroc([0.1], [float('inf')])
    with pytest.raises(ValueError, match='boolean'):
        oscr([0.1, 0.2], [0, 3], [0.2])
    for tpr in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match='tpr'):
            fpr_at_tpr([0.1], [0.2], tpr)


# ---------------------------------------------------------------- summarize

def test_summarize_matches_numpy():
    rng = np.random.default_rng(1)
    recs = [dict(split=i, name='cifar10', auroc=float(a), acc=float(b)) for i, (a, b) in enumerate(rng.random((5, 2)))]
    s = summarize(recs)
    assert list(s) == ['split', 'auroc', 'acc']  # numeric keys in first-seen order; strings skipped
    for k in ('auroc', 'acc'):
        vals = [r[k] for r in recs]
        assert s[k] == pytest.approx((np.mean(vals), np.std(vals)))  # default: population std, as np.std
        assert summarize(recs, ddof=1)[k] == pytest.approx((np.mean(vals), np.std(vals, ddof=1)))
    assert all(type(x) is float for pair in s.values() for x in pair)


def test_summarize_errors_and_edge_cases():
    with pytest.raises(ValueError, match='at least one'):
        summarize([])
    with pytest.raises(ValueError, match='missing'):
        summarize([dict(auroc=0.9, acc=0.8), dict(auroc=0.9)])
    assert summarize([dict(auroc=0.9)]) == dict(auroc=(0.9, 0.0))
    assert np.isnan(summarize([dict(auroc=0.9)], ddof=1)['auroc'][1])


def test_format_mean_std():
    assert format_mean_std((0.951, 0.0123)) == '95.1 ± 1.2'
    assert format_mean_std((0.951, 0.0123), scale=1, digits=3) == '0.951 ± 0.012'


def reference_style_oscr(sk, correct, su):
    """OSCR as the widely copied ARPL `compute_oscr` computes it (written from its description, distinct scores only):
    samples in ascending score order s_(0) < ... < s_(n-1); for k = 0 .. n-2 the point pairs the FPR of the threshold
    S >= s_(k) with the CCR of S > s_(k) (one sample later); the top threshold's point and the end point (1, ACC) are
    never computed; (0, 0) and (1, 1) are added; trapezoid area over the points sorted by decreasing (FPR, CCR)."""
    s = np.r_[sk, su]
    hit = np.r_[correct, np.zeros(len(su), bool)].astype(float)[np.argsort(s)]
    unk = np.r_[np.zeros(len(sk)), np.ones(len(su))][np.argsort(s)]
    n = len(s)
    pts = [(unk[k:].sum() / len(su), hit[k + 1:].sum() / len(sk)) for k in range(n - 1)] + [(0., 0.), (1., 1.)]
    f, c = np.array(sorted(pts, reverse=True)).T
    return float(np.sum((f[:-1] - f[1:]) * (c[:-1] + c[1:]) / 2))


def test_oscr_hand_computed_against_the_reference_convention():
    # knowns 0.9 (correct), 0.8 (wrong), 0.4 (correct); unknowns 0.6, 0.3.
    # pmal (one point per threshold S >= t, from (0,0) to (1, ACC)):
    #   (0,0) (0,1/3) (0,1/3) (1/2,1/3) (1/2,2/3) (1,2/3): area 1/2 * 1/3 + 1/2 * 2/3 = 1/2
    # reference (FPR of S >= s_(k) with CCR of S > s_(k)): (1,2/3) (1/2,1/3) (1/2,1/3) (0,1/3) + (0,0) (1,1):
    #   area 1/2 * (1/3 + 2/3)/2 + 1/2 * 1/3 = 1/4 + 1/6 = 5/12 -- the correct known at 0.4 is counted one step late
    sk, correct, su = np.array([0.9, 0.8, 0.4]), np.array([True, False, True]), np.array([0.6, 0.3])
    fpr, ccr = oscr_curve(sk, correct, su)
    assert np.allclose(fpr, [0, 0, 0, .5, .5, 1]) and np.allclose(ccr, [0, 1/3, 1/3, 1/3, 2/3, 2/3])
    assert oscr(sk, correct, su) == pytest.approx(1 / 2)
    assert reference_style_oscr(sk, correct, su) == pytest.approx(5 / 12)
    # one correct known at 1, one unknown at 0: pmal (0,0) (0,1) (1,1) -> 1; the reference misses (0,1) -> 1/2
    assert oscr([1.], [True], [0.]) == 1.0
    assert reference_style_oscr(np.array([1.]), np.array([True]), np.array([0.])) == pytest.approx(0.5)


@pytest.mark.parametrize('seed', SEEDS)
def test_reference_convention_is_never_higher(seed):
    # each reference point is a true point moved right by one unknown, or kept: its area is never larger
    sk, correct, su = random_case(seed)
    assert reference_style_oscr(sk, correct, su) <= oscr(sk, correct, su) + 1e-12


def test_fpr95_convention_known_is_positive():
    # pmal: knowns are the positives. Threshold t = the score that accepts >= 95% of the knowns (S >= t);
    # FPR95 = fraction of UNKNOWNS with S >= t. Knowns 1..20: m = ceil(0.95 * 20) = 19, t = 2;
    # unknowns 0, 1.5, 2, 3, 10: three have S >= 2 -> 3/5.
    # The other convention (unknown = positive, score -S): 95% of the 5 unknowns -> m = 5, t = -10 on -S,
    # i.e. every known with S <= 10 is called unknown -> 10/20. pmal reports 0.6, not 0.5.
    knowns, unknowns = np.arange(1., 21.), np.array([0., 1.5, 2., 3., 10.])
    assert fpr_at_tpr(knowns, unknowns) == pytest.approx(0.6)
    assert fpr_at_tpr(-unknowns, -knowns) == pytest.approx(0.5)  # the roles swapped: the other convention
    assert openset_metrics(np.zeros(20), np.zeros(20), knowns, unknowns)['fpr95'] == pytest.approx(0.6)
