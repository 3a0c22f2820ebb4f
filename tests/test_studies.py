"The study scripts' measures (benchmarks/study_tiny_cpu.py), on hand-made figure data whose answers are known."
import warnings

import numpy as np
import pytest

from conftest import load_benchmark


@pytest.fixture(scope='module')
def study(): return load_benchmark('study_tiny_cpu')


def figure_data(pick):
    "Two classes of 5 candidates each on a line (class 1 shifted by 100), one non-candidate; prototypes `pick` per class."
    c = np.array([[-2.], [-1.], [0.], [1.], [2.], [98.], [99.], [100.], [101.], [102.], [50.]])
    r = np.array([.1, .2, .3, .4, .5, .1, .2, .3, .4, .5, .9], dtype=np.float32)
    labels = np.array([0] * 5 + [1] * 5 + [0])
    candidates = np.array([True] * 10 + [False])
    return dict(train_c=c, r=r, labels=labels, candidates=candidates, indices=np.array(pick))


def test_prototypes_at_the_class_edges_are_far_from_the_centre(study):
    r_p, r_c, pairwise, ratio = study.prototype_placement(figure_data([[0, 4], [5, 9]]))
    assert np.isclose(r_p, .3) and np.isclose(r_c, .3)  # the non-candidate (r = .9) is not in the candidates' mean
    assert np.isclose(pairwise, 4.)
    assert np.isclose(ratio, 2. / 1.2) and study.candidate_counts(figure_data([[0, 4], [5, 9]]))[2] == 0  # mean |x - centre| of the picks (2) over the candidates' (6/5)


def test_prototypes_at_the_centre_and_the_candidates_themselves(study):
    assert np.isclose(study.prototype_placement(figure_data([[2, 2], [7, 7]]))[3], 0.)
    whole = study.prototype_placement(figure_data([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]))
    assert np.isclose(whole[3], 1.) and np.isclose(whole[0], whole[1])


def test_one_prototype_per_class_has_no_pairwise_distance(study):
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # numpy's 'Mean of empty slice' would fail here
        r_p, _, pairwise, ratio = study.prototype_placement(figure_data([[4], [9]]))
    assert np.isnan(pairwise) and np.isclose(ratio, 2. / 1.2) and np.isclose(r_p, .5)


def test_a_class_short_of_candidates_is_measured_against_the_pool_it_was_filled_from(study):
    "Class 0 has one candidate; T = 2 fills its second prototype from outside (the non-candidate at 50), as a high eps does."
    d = figure_data([[4, 10], [5, 9]])
    d['candidates'][:4] = False
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a division by a zero spread would fail here
        r_p, r_pool, pairwise, ratio = study.prototype_placement(d)
    assert np.isclose(ratio, (1. + 2. / 1.2) / 2)  # class 0: pool {2, 50}, both picked, ratio 1; class 1 as before
    assert study.candidate_counts(d) == (1, 1, .25) and np.isclose(r_pool, ((.5 + .9) / 2 + .3) / 2) and np.isclose(pairwise, (48 + 4) / 2)
    one = study.prototype_placement({**d, 'indices': np.array([[4], [9]])})  # class 0: a pool of one, no ratio
    assert np.isclose(one[3], 2. / 1.2)  # the mean of the classes that have one


def test_placement_against_auroc_keeps_only_runs_that_differ_in_the_mining(study):
    base = dict(T=10, U=2, delta=0.5, lambda_p=1.0, distance='point_to_set')
    runs = [(base, 1.0, .70), (base, 1.2, .66), (base, 1.5, .62), (base, 1.8, .60)]  # farther out, lower AUROC
    rho, p, n = study.placement_against_auroc(runs)
    assert n == 4 and np.isclose(rho, -1.) and p < .05
    other = [({**base, 'delta': 1.0}, 2.0, .90), ({**base, 'T': 1}, 1.1, .10), ({**base, 'distance': 'nearest'}, 3.0, .95)]
    assert study.placement_against_auroc(runs + other)[:3] == (rho, p, 4)  # phase 2 or the rule changed: left out
    assert study.placement_against_auroc(runs[:2] + other) == (None, None, 2)
    repetition = [({**base, 'seed': 1}, 1.0, .10), ({**base, 'seed': 2}, 3.0, .95)]  # other phase-1 models
    assert study.placement_against_auroc(runs + repetition)[:3] == (rho, p, 4)
    assert study.placement_against_auroc(runs + repetition, seed=1)[2] == 1
