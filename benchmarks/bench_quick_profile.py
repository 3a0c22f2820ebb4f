"""Time one PMAL run of the `quick` profile on a grey 28x28 data set of about 3,500 known training images.

The issue's target: under 5 minutes on 2 CPU cores. The data are sklearn's digits, upscaled to 24x24 and placed at
a random offset in a 28x28 frame (seeded), 5,800 training and 2,000 test images, digits 0,1,2,4,5,9 known (MNIST
split 0), written as an npz and run through the same driver as every experiment.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_quick_profile.py [--out DIR]
"""
import argparse, json, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits


def grey28(path, n_train=5800, n_test=2000, seed=0):
    "Write the 28x28 grey npz; returns the number of known training images."
    d = load_digits()
    big = F.interpolate(torch.tensor(d.images, dtype=torch.float32)[:, None] / 16, size=(24, 24), mode='bilinear')
    rng = np.random.default_rng(seed)

    def sample(n):
        idx, out = rng.integers(0, len(big), n), np.zeros((n, 28, 28), np.uint8)
        for j, i in enumerate(idx):
            dy, dx = rng.integers(0, 5, 2)
            out[j, dy:dy + 24, dx:dx + 24] = (big[i, 0].numpy() * 255).astype(np.uint8)
        return out, d.target[idx]

    (xt, yt), (xs, ys) = sample(n_train), sample(n_test)
    known = np.array([0, 1, 2, 4, 5, 9])
    np.savez(path, x_train=xt, y_train=yt, x_test=xs, y_test=ys, known=known)
    return int(np.isin(yt, known).sum())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default=None, help='results store (default: a temporary folder)')
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / 'grey28.npz', args.out or str(Path(tmp) / 'runs')
        n = grey28(data)
        t = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / 'pmal-reproduce'), 'run', '--set', f'dataset=npz:{data}',
                        '--set', 'method=pmal', '--set', 'profile=quick', '--out', out], check=True)
        wall = time.perf_counter() - t
        record = json.loads(next(Path(out, 'records').glob('*.json')).read_text())
    print(f"known training images: {n}, backbone {record['settings']['backbone']}, "
          f"{record['settings']['epochs']} epochs x (U=2 phase-1 models + phase 2)")
    print(f"wall time of the run: {wall:.1f} s (fit {record['timings']['fit_s']:.1f} s); target < 300 s")
    print({k: round(v, 3) for k, v in record['metrics'].items() if k.endswith(('acc', 'auroc'))})


if __name__ == '__main__':
    main()
