"""Time and peak memory of the embedding topology robustness (Eq. 7, `pmal.robustness.topology_robustness`).

Every measurement runs in a fresh Python process, so its peak RSS (resource.getrusage ru_maxrss) is its own
(tracemalloc does not see torch's allocations). Measured:
  1. the exact, blocked r at --n samples, --k classes, --u spaces (default 50,000 x 10, U = 2);
  2. at --naive-n samples (default 10,000): the naive full-matrix computation (both N x N distance matrices in
     memory) beside the blocked one, and the max abs difference of their r.
Usage:  python benchmarks/bench_robustness.py
        python benchmarks/bench_robustness.py --device cuda --n 115000 --k 1000 --naive-n 20000
Not a unit test: numbers depend on the machine and on what else runs on it.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch

from pmal.robustness import rms_distance, scaled_gap, topology_robustness


def make_spaces(n, k, u, device, seed=0):
    "U spaces of centred logits (n x k, float32): one shared structure plus per-space noise of varying size."
    g = torch.Generator().manual_seed(seed)
    base = 3 * torch.randn(n, k, generator=g)
    sigma = torch.rand(n, 1, generator=g)
    spaces = [base + sigma * torch.randn(n, k, generator=g) for _ in range(u)]
    return [(c - c.mean(1, keepdim=True)).to(device) for c in spaces]


def naive_robustness(centred, scaling):
    "Eq. 7 with both full N x N distance matrices in memory (the straightforward way), same scaling."
    if 'rms' in scaling: centred = [c / rms_distance(c, c) for c in centred]
    D = [torch.cdist(c, c) for c in centred]
    gap = torch.stack([(D[a] - D[b]).norm(dim=1) for a in range(len(D)) for b in range(a + 1, len(D))])
    return torch.exp(-scaled_gap(gap, scaling, len(centred[0]))).clamp_min(torch.finfo(gap.dtype).tiny).mean(0)


def sync(device):
    if torch.device(device).type == 'cuda': torch.cuda.synchronize()


def worker(args):
    "One measurement in this (fresh) process; prints one JSON line."
    if args.threads: torch.set_num_threads(args.threads)
    spaces = make_spaces(args.n, args.k, args.u, args.device)
    sync(args.device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.device(args.device).type == 'cuda': torch.cuda.reset_peak_memory_stats()
    fn = (lambda: naive_robustness(spaces, args.scaling)) if args.worker == 'naive' else \
        (lambda: topology_robustness(spaces, scaling=args.scaling, block_size=args.block_size))
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter(); r = fn(); sync(args.device); times.append(time.perf_counter() - t0)
    out = dict(kind=args.worker, n=args.n, k=args.k, u=args.u, device=args.device, threads=torch.get_num_threads(),
               seconds=min(times), all_seconds=[round(t, 3) for t in times],
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_before_mb=rss_before)
    if torch.device(args.device).type == 'cuda': out['peak_cuda_mb'] = torch.cuda.max_memory_allocated() / 2**20
    if args.save: torch.save(r.cpu(), args.save)
    print(json.dumps(out))


def measure(kind, n, args, save=None):
    "Run one measurement in a fresh subprocess and return its JSON record."
    cmd = [sys.executable, __file__, '--worker', kind, '--n', str(n), '--k', str(args.k), '--u', str(args.u),
           '--device', args.device, '--scaling', args.scaling, '--repeat', str(args.repeat)]
    if args.block_size: cmd += ['--block-size', str(args.block_size)]
    if args.threads: cmd += ['--threads', str(args.threads)]
    if save: cmd += ['--save', save]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} at N={n} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def show(rec):
    extra = f", peak CUDA {rec['peak_cuda_mb']:.0f} MB" if 'peak_cuda_mb' in rec else ''
    print(f"{rec['kind']:8s} N={rec['n']:>7,} K={rec['k']:>5} U={rec['u']}  {rec['seconds']:7.2f} s "
          f"(runs {rec['all_seconds']})  peak RSS {rec['peak_rss_mb']:7.0f} MB "
          f"(after data {rec['rss_before_mb']:.0f} MB){extra}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n', type=int, default=50_000, help='samples for the exact blocked r')
    p.add_argument('--k', type=int, default=10, help='classes (centred-logit dimension)')
    p.add_argument('--u', type=int, default=2, help='embedding spaces')
    p.add_argument('--naive-n', type=int, default=10_000, help='samples for naive vs blocked (0: skip)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--scaling', default='rms_excess')
    p.add_argument('--block-size', type=int, default=None)
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    p.add_argument('--repeat', type=int, default=1, help='runs per process; the minimum is reported')
    p.add_argument('--worker', choices=['blocked', 'naive'], help=argparse.SUPPRESS)
    p.add_argument('--save', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker: return worker(args)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith('cuda') else ''))
    show(measure('blocked', args.n, args))
    if args.naive_n:
        with tempfile.TemporaryDirectory() as d:
            a, b = os.path.join(d, 'blocked.pt'), os.path.join(d, 'naive.pt')
            show(measure('blocked', args.naive_n, args, save=a))
            show(measure('naive', args.naive_n, args, save=b))
            ra, rb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
            print(f"max |r_blocked - r_naive| at N={args.naive_n:,}: {(ra - rb).abs().max().item():.2e} "
                  f"(r in [{ra.min().item():.3f}, {ra.max().item():.3f}])")


if __name__ == '__main__':
    main()
