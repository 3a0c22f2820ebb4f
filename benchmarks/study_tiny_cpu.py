"""The choices behind the `tiny_cpu` profile, measured on a validation carve of TinyImageNet's training classes.

Never the test split: `pmal.pipeline.carve_validation` holds 5 of split 0's 20 known classes out as pseudo-unknown
and 20% of the other 15 classes' training images as pseudo-known test images (6,000 / 1,500 / 2,500 images).

  recipe  BACKBONE:EPOCHS:LR_STEP_FRACTION:LR:FIRST_HELD_OUT ...   a softmax model per spec (bf16, channels-last,
          32 px), its validation ACC and MSP/MLS AUROC, e.g. classifier32_small:40:0.7:0.001:15
  bn      PMAL's phase 2 with each BatchNorm mode of the prototype pass (proto_bn) from one shared phase 1
  scaling for the phase-1 models of a finished PMAL run in a results store: how well r predicts M1's correctness on
          the training images (the claim of Fig. 4(a)) under each scaling of Eq. 7
  prototypes  where each finished PMAL run of a store put its prototypes, from the runs' figure data (no data, no
          training): their mean quality score q (r, or the run's quality rule) against the pool's (the candidates, and the
          images a shortfall under T was filled with), their spread, their distance from the pool's centre in M1's
          centred logits (the space Algorithm 1 measures diversity in), the classes with fewer / more than T candidates
          and the share of prototypes filled in from outside them, and how the distance from the centre ranks against DR AUROC over the runs that differ only in
          the mining

Usage: python benchmarks/study_tiny_cpu.py recipe classifier32_small:40:0.7:0.001:15 --data-root DATA
       python benchmarks/study_tiny_cpu.py bn --epochs 40 --data-root DATA
       python benchmarks/study_tiny_cpu.py scaling --store results/tiny_cpu --data-root DATA
       python benchmarks/study_tiny_cpu.py prototypes --store results/tiny_cpu_fp32
Results print to stdout (the logs in benchmarks/measured/ are its output).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pmal.batches import downsample_split, make_batches
from pmal.data import load_openset
from pmal.models import create_model
from pmal.pipeline import PMAL, PMALConfig, SoftmaxCriterion, carve_validation, embed_part, evaluate_model, part_labels
from pmal.train import Recipe, fit

CPU = dict(amp=True, channels_last=True)


def carve(data_root, first_held_out=15):
    full = downsample_split(load_openset('tinyimagenet', 0, root=data_root), 32)
    return carve_validation(full, held_out=list(range(first_held_out, first_held_out + 5)), val_fraction=0.2)


def study_recipe(specs, data_root):
    carves = {}
    for spec in specs:
        backbone, epochs, fraction, lr, held = spec.split(':')
        epochs, fraction, lr, held = int(epochs), float(fraction), float(lr), int(held)
        split = carves.setdefault(held, carve(data_root, held))
        torch.manual_seed(0)
        model = create_model(backbone, split.num_classes, 3)
        recipe = Recipe(epochs=epochs, lr=lr, lr_step=max(1, round(epochs * fraction)), **CPU)
        t = time.time()
        history = fit(model, make_batches(split.train, split, 128, train=True, seed=0), recipe, progress=False)
        res = evaluate_model(model, SoftmaxCriterion(), split)
        print(f"{spec} fit {time.time() - t:.0f}s train_acc {history[-1]['acc']:.3f} acc {res['msp_acc']:.3f} "
              f"msp_auroc {res['msp_auroc']:.3f} mls_auroc {res['mls_auroc']:.3f}", flush=True)


def study_bn(epochs, data_root, held=15, modes=('batch', 'eval', 'joint', 'train')):
    split = carve(data_root, held)
    recipe = Recipe(epochs=epochs, lr=0.001, lr_step=max(1, round(0.7 * epochs)), **CPU)
    t = time.time()
    base = PMAL.for_split(split, backbone='classifier32_small', recipe=recipe, progress=False).mine(split)
    print(f"phase 1 + mining {time.time() - t:.0f}s", flush=True)
    for mode in modes:
        t = time.time()
        v = PMAL.for_split(split, backbone='classifier32_small', recipe=recipe, config=PMALConfig(proto_bn=mode),
                           progress=False)
        v.phase1_models, v.prototypes = base.phase1_models, base.prototypes
        m = v.learn(split).evaluate(split)
        print(f"proto_bn={mode:<6} phase 2 {time.time() - t:.0f}s " +
              ' '.join(f"{k} {m[k]:.3f}" for k in ('msp_acc', 'dr_auroc', 'msp_auroc', 'dr_oscr')), flush=True)


def study_scaling(store, data_root, split_index=0):
    "r under each scaling, from the two phase-1 models of the store's PMAL run: AUROC of r for M1 being right."
    from pmal.store import ResultsStore
    from pmal.settings import load_profile
    from pmal.robustness import SCALINGS, topology_robustness
    from pmal.metrics import auroc
    store = ResultsStore(store)
    default = dict(method='pmal', split=split_index, seed=0, T=10, U=2, eps=0.7, delta=0.5, lambda_p=1.0,
                   quality='robustness', diversity='algorithm1', distance='point_to_set')  # Table 1's PMAL run
    runs = [r for r in store.records() if r['status'] == 'done'
            and all(r['settings'][k] == v for k, v in default.items())]
    s = runs[0]['settings']
    split = downsample_split(load_openset('tinyimagenet', split_index, root=data_root), load_profile(s['profile']).image_size)
    work = store.work_dir(runs[0]['key'])
    models = []
    for u in range(2):
        m = create_model(s['backbone'], split.num_classes, 3)
        m.load_state_dict(torch.load(work / f'phase1_model{u}.pt', map_location='cpu', weights_only=True)['model'])
        models.append(m)
    outs = [embed_part(m, split.train, split) for m in models]
    y = part_labels(split.train)
    right = (outs[0][1].argmax(1) == y).float()
    print(f"M1 training accuracy (eval mode, no augmentation) {right.mean():.3f}")
    from pmal.mahalanobis import centred_logits
    centred = [centred_logits(z, m.head.weight.detach().float()) for (z, _), m in zip(outs, models)]
    rs = {}
    for scaling in SCALINGS:
        r = topology_robustness(centred, scaling=scaling)
        rs[scaling] = r
        print(f"scaling={scaling:<12} AUROC of r for 'M1 is right' {auroc(r[right == 1], r[right == 0]):.3f}")
    from scipy.stats import spearmanr
    for a in SCALINGS:
        print(f"Spearman(r[{a}], r[median]) {spearmanr(rs[a].numpy(), rs['median'].numpy()).statistic:.3f}")


def prototype_placement(d):
    """Class means of: the prototypes' quality score, the pool's, their pairwise distance, their distance to the pool's
    centre / the pool's own. The pool is what the rule chose
    from: the class's candidates, and where it had fewer than T of them, the images the shortfall was filled with (the
    next by quality, pmal.diversity); a ratio over a pool of one image is undefined (nan) and left out of the mean."""
    import numpy as np
    from scipy.spatial.distance import pdist
    c, q = d['train_c'].astype(np.float64), d['r']
    rows = []
    for k, pick in enumerate(d['indices']):
        picked = np.zeros(len(c), bool)
        picked[pick] = True
        pool = (d['candidates'] | picked) & (d['labels'] == k)
        centre = c[pool].mean(0)
        from_centre = lambda x: np.linalg.norm(x - centre, axis=1).mean()
        spread = from_centre(c[pool])
        pairs = pdist(c[pick])
        pairwise = pairs.mean() if len(pairs) else np.nan  # one prototype per class (T = 1): no pairs
        ratio = from_centre(c[pick]) / spread if spread > 0 else np.nan
        rows.append((q[pick].mean(), q[pool].mean(), pairwise, ratio))
    rows = np.array(rows)
    return tuple(np.nanmean(col) if np.isfinite(col).any() else np.nan for col in rows.T)


def candidate_counts(d):
    """From `pmal.mining.Prototypes.shortfall`: the classes with fewer than T candidates, the classes with more (where
    the diversity rule had a choice), and the share of prototypes filled in from outside the candidates."""
    import numpy as np
    import torch
    from pmal.mining import Prototypes
    P = Prototypes(*(torch.from_numpy(np.asarray(d[k])) for k in ('indices', 'r', 'candidates', 'labels')))
    short = P.shortfall()
    return short['classes_short'], sum(n > P.T for n in short['candidates_per_class']), short['filled'] / P.indices.numel()


# Everything but the mining (quality rule, diversity rule, ε) at PMAL's defaults: runs that differ only in where the
# prototypes were put, so their centre ratios can be set against their DR AUROC.
NOT_MINING = ('T', 'U', 'delta', 'lambda_p', 'distance')


def placement_against_auroc(runs, seed=0):
    """Spearman's rank correlation of the centre ratio with DR AUROC over `runs` (settings, ratio, auroc) that keep
    NOT_MINING at PMALConfig's defaults and share one seed (another seed: other phase-1 models); returns (rho, p-value,
    number of runs), rho None under 3 runs."""
    from scipy.stats import spearmanr
    from pmal.pipeline import PMALConfig
    defaults = {k: getattr(PMALConfig(), k) for k in NOT_MINING}
    kept = [(ratio, auroc) for s, ratio, auroc in runs
            if s.get('seed', 0) == seed and all(s[k] == v for k, v in defaults.items())]
    if len(kept) < 3: return None, None, len(kept)
    rho, p = spearmanr(*zip(*kept))
    return float(rho), float(p), len(kept)


def study_prototypes(store, split_index=0):
    "Where the mining rules of the store's finished PMAL runs on one split put the prototypes (runs with figure data only)."
    from pmal.store import ResultsStore
    from pmal.figures import load_figure_data
    store = ResultsStore(store)
    runs = [r for r in store.records() if r['settings']['method'] == 'pmal' and r['settings']['split'] == split_index]
    print(f"{'run':<44} {'quality':<18} {'diversity':<10} {'eps':>4} {'T':>3} {'DR distance':<12}  q(protos)  q(pool) pairwise  centre ratio  short  chose  filled  DR AUROC")
    placed = []
    for rec in sorted(runs, key=lambda r: r['key']):
        d = load_figure_data(store, rec['key'])  # None: not done, or its figure data is not on this machine
        if d is None: continue
        s = rec['settings']
        q_protos, q_pool, pairwise, ratio = prototype_placement(d)
        short, chose, filled = candidate_counts(d)
        print(f"{rec['key']:<44} {s['quality']:<18} {s['diversity']:<10} {s['eps']:>4} {s['T']:>3} {s['distance']:<12}  {q_protos:9.3f} {q_pool:8.3f} "
              f"{pairwise:8.2f}  {ratio:12.2f}  {short:5d}  {chose:5d}  {filled:6.2f}  {100 * rec['metrics']['dr_auroc']:8.1f}")
        placed.append((s, ratio, rec['metrics']['dr_auroc']))
    rho, p, n = placement_against_auroc(placed)
    if rho is not None:
        print(f"Spearman(centre ratio, DR AUROC) over the {n} runs that differ only in the mining (quality, diversity, eps; "
              f"{', '.join(NOT_MINING)} at PMAL's defaults): {rho:+.2f} (p = {p:.3f}; one seed each)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('study', choices=('recipe', 'bn', 'scaling', 'prototypes'))
    p.add_argument('specs', nargs='*')
    p.add_argument('--data-root', default=None)
    p.add_argument('--epochs', type=int, default=40)
    p.add_argument('--store', default='results/tiny_cpu')
    a = p.parse_args(argv)
    if a.study == 'recipe': study_recipe(a.specs, a.data_root)
    elif a.study == 'bn': study_bn(a.epochs, a.data_root)
    elif a.study == 'scaling': study_scaling(a.store, a.data_root)
    else: study_prototypes(a.store)


if __name__ == '__main__':
    main()
