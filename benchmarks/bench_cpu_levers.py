"""CPU training levers, side by side in one run: what makes the `tiny_cpu` profile fit on a 2-core CPU.

Each configuration trains pmal's real training step (pmal.train: DeviceBatches with crop + flip, the criterion,
backward, Adam) on synthetic uint8 images for a fixed number of timed steps after warm-up steps, and prints
training images per second (data images only: phase 2's prototype images are overhead, not throughput).

Levers:
  fp32            float32, default memory format, eager (the old CPU path)
  fp32_cl         + Recipe(channels_last=True), still float32 (the tiny_cpu_fp32 profile)
  fp32_cl_compile + Recipe(compile=True)
  bf16            + Recipe(amp=True): bf16 autocast on the CPU (AMX-BF16 units where the CPU has them)
  bf16_cl         + Recipe(channels_last=True)
  bf16_cl_compile + Recipe(compile=True): torch.compile (inductor, C++ backend)
Phase 2 (PMAL's criterion with K x T prototype images through the current model each step), on the fastest eager
lever of the run (bf16_cl on a CPU with bf16 units, fp32_cl on one without):
  p2_batch        proto_bn='batch': a second forward/backward pass over the K x T prototypes (the default)
  p2_joint        proto_bn='joint': data batch and prototypes in one pass
  p2_nograd       proto_bn='batch', proto_grad=False: the prototype pass without gradient
Determinism: that lever is run twice from the same seed; the two weight sets must be identical.
The first line names the CPU and whether it has bf16 units (pmal.train.cpu_has_bf16_units: AVX512-BF16 or AMX on x86):
without them bf16 is emulated and far slower than float32.

Usage:
  python benchmarks/bench_cpu_levers.py                       # the default matrix (about 5 minutes on 2 cores)
  python benchmarks/bench_cpu_levers.py --steps 3 --quick      # smoke test
Not a unit test: numbers depend on the machine and on what else runs on it; keep the machine otherwise idle.
"""
import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from pmal.batches import DeviceBatches
from pmal.data import ImageSet
from pmal.files import write_json_atomic
from pmal.models import create_model
from pmal.pipeline import PMALConfig, PMALCriterion
from pmal.run import hardware
from pmal.train import Recipe, SoftmaxCriterion, cpu_has_bf16_units, make_step, prepare_training

LEVERS = dict(fp32={}, fp32_cl=dict(channels_last=True), fp32_cl_compile=dict(channels_last=True, compile=True),
              bf16=dict(amp=True), bf16_cl=dict(amp=True, channels_last=True),
              bf16_cl_compile=dict(amp=True, channels_last=True, compile=True))
EAGER = ('fp32', 'fp32_cl', 'bf16', 'bf16_cl')  # the candidates for the phase-2 lever (no compilation)
PHASE2 = dict(p2_batch=dict(proto_bn='batch'), p2_joint=dict(proto_bn='joint'),
              p2_nograd=dict(proto_bn='batch', proto_grad=False))
MEAN, STD = (0.48, 0.45, 0.40), (0.28, 0.27, 0.28)


def synthetic(side, n, classes=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g),
                    torch.randint(0, classes, (n,), generator=g))


def make_criterion(phase2, side, classes, T, seed=0):
    if phase2 is None: return SoftmaxCriterion()
    g = torch.Generator().manual_seed(seed)
    return PMALCriterion(torch.randn(classes, T, 3, side, side, generator=g), PMALConfig(T=T, **PHASE2[phase2]))


def throughput(backbone, side, lever, phase2=None, steps=10, warmup=3, batch=128, classes=20, T=10, seed=0):
    "Training images per second of `steps` timed steps (after `warmup`), and the final weights."
    recipe = replace(Recipe(batch_size=batch, seed=seed), **LEVERS[lever])
    torch.manual_seed(seed)
    model = create_model(backbone, classes, 3)
    criterion = make_criterion(phase2, side, classes, T, seed)
    optimizer, *_ = prepare_training(model, criterion, recipe, torch.device('cpu'))
    step = make_step(torch.compile(model) if recipe.compile else model, criterion, optimizer, recipe, 'cpu')
    data = DeviceBatches(synthetic(side, batch * (steps + warmup), classes, seed), batch, shuffle=True,
                         augment='crop_flip', mean=MEAN, std=STD, device='cpu', seed=seed)
    step.train()
    for i, (x, y) in enumerate(data.epoch(0)):
        if recipe.channels_last: x = x.contiguous(memory_format=torch.channels_last)
        if i == warmup: t0 = time.perf_counter()
        step(x, y)
    seconds = time.perf_counter() - t0
    return batch * steps / seconds, [t.detach().clone() for t in model.state_dict().values()]


def fastest_eager(rows, backbone, side):
    "The fastest lever without compilation measured so far for (backbone, side)."
    sel = [r for r in rows if (r['backbone'], r['side'], r['phase2']) == (backbone, side, None) and r['lever'] in EAGER]
    return max(sel, key=lambda r: r['img_per_s'])['lever']


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--backbones', nargs='+', default=['classifier32', 'classifier32_small'])
    p.add_argument('--sides', nargs='+', type=int, default=[32, 64])
    p.add_argument('--steps', type=int, default=8)
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: all cores)')
    p.add_argument('--quick', action='store_true', help='32 px only, fewer configurations')
    p.add_argument('--json', default=None, help='also write the figures to this JSON file')
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    sides = [32] if a.quick else a.sides
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {hardware('cpu')['cpu']}, bf16 units: "
          f"{ {True: 'yes', False: 'no (bf16 is emulated)', None: 'unknown'}[cpu_has_bf16_units()] }, "
          f"batch 128, {a.steps} timed steps per configuration")
    rows = []
    def run(backbone, side, lever, phase2=None):
        ips, _ = throughput(backbone, side, lever, phase2, steps=a.steps)
        rows.append(dict(backbone=backbone, side=side, lever=lever, phase2=phase2, img_per_s=round(ips, 1)))
        print(f"{backbone:<20} {side:>3} px  {lever:<16} {phase2 or '':<10} {ips:8.1f} img/s", flush=True)
    for backbone in a.backbones:
        for side in sides:
            if side == 64 and backbone != 'classifier32': continue
            levers = ['fp32', 'fp32_cl', 'bf16_cl'] if a.quick or side == 64 else list(LEVERS)
            for lever in levers: run(backbone, side, lever)
            if side == 32:
                for phase2 in PHASE2: run(backbone, side, fastest_eager(rows, backbone, side), phase2)
    # determinism of the fastest eager lever on the CPU
    lever = fastest_eager(rows, a.backbones[-1], 32)
    _, w1 = throughput(a.backbones[-1], 32, lever, steps=2, warmup=1)
    _, w2 = throughput(a.backbones[-1], 32, lever, steps=2, warmup=1)
    same = all(torch.equal(x, y) for x, y in zip(w1, w2))
    print(f"{lever} twice from one seed ({a.backbones[-1]}, 3 steps): weights identical: {same}")
    print("\nside by side (img/s):")
    for backbone in a.backbones:
        for side in sides:
            sel = [r for r in rows if r['backbone'] == backbone and r['side'] == side]
            if sel: print(f"  {backbone} {side} px: " + ', '.join(f"{r['phase2'] or r['lever']} {r['img_per_s']:.0f}" for r in sel))
    if a.json:
        write_json_atomic(dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=hardware('cpu')['cpu'],
                               bf16_units=cpu_has_bf16_units(), rows=rows, deterministic=same), a.json)


if __name__ == '__main__':
    main()
