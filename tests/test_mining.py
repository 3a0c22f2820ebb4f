"Package-level tests of pmal.mining: mine_prototypes, Prototypes save/load, the Table 4 options, figure data."
import json

import numpy as np
import pytest
import torch

from pmal.mining import Prototypes, accuracy_by_r, class_view, embedding_2d, mine_prototypes


def two_spaces(n_per_class=40, K=3, D=12, seed=0, noise=3.0):
    "Two rotated views of the same class-relevant features; every third sample carries large noise."
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, D, generator=g) * 4
    y = torch.arange(K).repeat_interleave(n_per_class)
    phi = means[y] + torch.randn(len(y), D, generator=g)
    noisy = torch.arange(len(y)) % 3 == 0
    Zs, Ws = [], []
    for _ in range(2):
        Q = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
        Zs.append(phi @ Q + noisy[:, None] * noise * torch.randn(len(y), D, generator=g))
        Ws.append(means @ Q)
    return Zs, Ws, y, noisy


@pytest.fixture(scope='module')
def data():
    return two_spaces()


def _check_rows(P, y, T):
    K = P.indices.shape[0]
    assert P.indices.shape == (K, T) and P.indices.dtype == torch.long
    assert all(len(set(row.tolist())) == T for row in P.indices)
    assert (y[P.indices] == torch.arange(K)[:, None]).all()


def test_mine_default_avoids_noisy(data):
    Zs, Ws, y, noisy = data
    P = mine_prototypes(Zs, Ws, y, T=4)
    _check_rows(P, y, 4)
    assert P.r.shape == (len(y),) and ((P.r >= 0) & (P.r <= 1)).all()
    assert P.candidates.dtype == torch.bool and P.candidates[P.indices].all()
    assert not noisy[P.indices.flatten()].any()
    assert P.settings['T'] == 4 and P.settings['eps'] == 0.7 and P.settings['quality'] == 'robustness'
    json.dumps(P.settings)  # settings must be JSON-able


def test_determinism(data):
    Zs, Ws, y, _ = data
    a, b = mine_prototypes(Zs, Ws, y, T=4), mine_prototypes([z.clone() for z in Zs], Ws, y, T=4)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.r, b.r) and torch.equal(a.candidates, b.candidates)
    for div in ['random', 'kmeans']:
        assert torch.equal(mine_prototypes(Zs, Ws, y, T=4, diversity=div, seed=3).indices,
                           mine_prototypes(Zs, Ws, y, T=4, diversity=div, seed=3).indices)


def test_save_load_roundtrip(tmp_path, data):
    Zs, Ws, y, _ = data
    P = mine_prototypes(Zs, Ws, y, T=4)
    P.positions = torch.randn(len(y), 2)
    path = P.save(tmp_path / 'deep' / 'prototypes.npz')
    assert sorted(p.name for p in path.parent.iterdir()) == ['prototypes.npz']
    Q = Prototypes.load(path)
    for name in ['indices', 'r', 'candidates', 'labels', 'positions']:
        a, b = getattr(P, name), getattr(Q, name)
        assert torch.equal(a, b) and a.dtype == b.dtype, name
    assert Q.settings == P.settings
    with np.load(path, allow_pickle=False) as f:  # plain arrays: no pickle needed
        assert set(f.files) == {'indices', 'r', 'candidates', 'labels', 'settings', 'positions'}
    P.save(path)  # overwriting works (atomic replace)
    with pytest.raises(FileNotFoundError, match='mine_prototypes'):
        Prototypes.load(tmp_path / 'nothing.npz')


def test_fill_from_class_warns_and_is_recorded():
    Zs, Ws, y, _ = two_spaces(n_per_class=40)
    with pytest.warns(UserWarning, match='fewer than T=30 candidates'):
        P = mine_prototypes(Zs, Ws, y, T=30, eps=0.99)
    _check_rows(P, y, 30)
    assert P.settings['filled_classes'] == [0, 1, 2] and P.settings['padded_classes'] == []
    for k in range(3):  # all candidates first, then the rest of the class
        cand_k = set(torch.nonzero(P.candidates & (y == k)).flatten().tolist())
        assert set(P.indices[k, :len(cand_k)].tolist()) == cand_k


@pytest.mark.parametrize('diversity', ['random', 'kmeans'])
def test_diversity_alternatives(data, diversity):
    Zs, Ws, y, _ = data
    P = mine_prototypes(Zs, Ws, y, T=5, diversity=diversity)
    _check_rows(P, y, 5)
    assert P.candidates[P.indices].all() and P.settings['diversity'] == diversity


@pytest.mark.parametrize('quality', ['max_probability', 'ensemble_variance', 'mc_dropout'])
def test_quality_rules(data, quality):
    Zs, Ws, y, noisy = data
    probs = torch.stack([(z @ W.T).softmax(-1) for z, W in zip(Zs, Ws)])
    p = probs[:1] if quality == 'max_probability' else probs
    P = mine_prototypes(Zs, Ws, y, T=4, quality=quality, probs=p)
    _check_rows(P, y, 4)
    if quality == 'max_probability':
        assert torch.allclose(P.r, probs[0].max(-1).values)
    else:
        assert torch.allclose(P.r, 1 - probs.var(0, unbiased=False).sum(-1), atol=1e-6)
    for k in range(3):  # the best-quality sample of each class is its first prototype
        cls = torch.nonzero(y == k).flatten()
        assert P.indices[k, 0] == cls[P.r[cls].argmax()]
    with pytest.raises(ValueError, match='needs probs'):
        mine_prototypes(Zs, Ws, y, quality=quality)


def test_input_errors(data):
    Zs, Ws, y, _ = data
    with pytest.raises(ValueError, match='U >= 2'):
        mine_prototypes(Zs[:1], Ws[:1], y)
    with pytest.raises(ValueError, match='quality must be'):
        mine_prototypes(Zs, Ws, y, quality='entropy')
    with pytest.raises(ValueError, match='same N'):
        mine_prototypes(Zs, Ws, y[:-1])


def test_figure_data(data):
    Zs, Ws, y, _ = data
    P = mine_prototypes(Zs, Ws, y, T=4)
    view = class_view(P, Zs[0], 2, method='pca', n_components=1)
    assert torch.equal(view['index'], torch.nonzero(y == 2).flatten())
    assert sorted(view['prototype_rank'][view['prototype_rank'] >= 0].tolist()) == [0, 1, 2, 3]
    assert view['position'].shape == (40, 1) and torch.equal(view['r'], P.r[y == 2])
    x = torch.randn(25, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(embedding_2d(x, seed=1), embedding_2d(x, seed=1))
    with pytest.raises(ValueError, match='method'):
        embedding_2d(x, method='umap')
    bins = accuracy_by_r(torch.tensor([0.1, 0.2, 0.9]), torch.tensor([1, 0, 1]), bins=4)
    assert bins['counts'].tolist() == [2, 0, 0, 1]
    assert bins['accuracy'][0] == 0.5 and torch.isnan(bins['accuracy'][1]) and bins['accuracy'][3] == 1
