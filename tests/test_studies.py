"The study scripts' measures (benchmarks/study_tiny_cpu.py), on hand-made figure data whose answers are known."
import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'study_tiny_cpu.py'


@pytest.fixture(scope='module')
def study():
    spec = importlib.util.spec_from_file_location('study_tiny_cpu', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    assert np.isclose(ratio, 2. / 1.2)  # mean |x - centre| of the picks (2) over the candidates' (6/5)


def test_prototypes_at_the_centre_and_the_candidates_themselves(study):
    assert np.isclose(study.prototype_placement(figure_data([[2, 2], [7, 7]]))[3], 0.)
    whole = study.prototype_placement(figure_data([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]))
    assert np.isclose(whole[3], 1.) and np.isclose(whole[0], whole[1])


def test_one_prototype_per_class_has_no_pairwise_distance(study):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # numpy's 'Mean of empty slice' would fail here
        r_p, _, pairwise, ratio = study.prototype_placement(figure_data([[4], [9]]))
    assert np.isnan(pairwise) and np.isclose(ratio, 2. / 1.2) and np.isclose(r_p, .5)
