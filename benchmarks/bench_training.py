"""Training throughput: pmal's small-benchmark fast path against the field's reference input pipeline.

Pipelines (same model, batch size, Adam step, device, synthetic uint8 data of the given shape):
  reference   torchvision-style Dataset that returns PIL images, transforms RandomCrop(size, padding=4) +
              RandomHorizontalFlip + ToTensor + Normalize, DataLoader(shuffle, num_workers, pin_memory), float32
              model, and the reference code's loop (`x.cuda()`, forward, CE, backward, step, `loss.item()` every step).
  fast_fp32   pmal.batches.DeviceBatches (the whole uint8 split on the device, batched crop+flip there) through
              pmal.train's own epoch loop, float32, default memory format: the input path alone.
  fast        the same + the recipe flags amp (bf16 autocast) and channels_last.
  fast_compile  fast + torch.compile (default mode, = Recipe(compile=True)), for the models in --compile-models.
  fast_graphs   fast + torch.compile(mode="reduce-overhead") (CUDA graphs of forward and backward; not a Recipe
              option), for the models in --compile-models.
  fast_stepgraph  fast + Recipe(cuda_graph=True): pmal.train.CUDAGraphStep replays the whole step (bf16 forward,
              backward, Adam(capturable=True), the epoch's loss and accuracy sums) as one CUDA graph.
  step_only   fast_stepgraph's step replayed on one fixed batch: no data path, no epoch loop (an upper bound).
Warm-up steps are excluded; the device is synchronised before each clock read. The number of timed steps is chosen
from a short calibration so that each configuration takes about --seconds (between --min-steps and --steps).
Epoch time = images in the split / images per second.

--concurrent U also times phase 1's U softmax models (--u-pipeline, first model and shape): one after the
other in one process; U processes at once on the same device (CUDA time-slices between them); and U threads with
a CUDA stream each in one process (pmal.train.run_concurrently, what train_softmax_models(concurrent=True) does).

Usage:
  python benchmarks/bench_training.py --device cuda --workers 8 --json bench.json --concurrent 2
  python benchmarks/bench_training.py --device cpu --models classifier32 --n-scale 0.01 --steps 4   # smoke test
Not a unit test: numbers depend on the machine and on what else runs on it.
"""
import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from pmal.batches import DeviceBatches
from pmal.data import ImageSet
from pmal.files import write_json_atomic
from pmal.models import create_model
from pmal.train import Recipe, SoftmaxCriterion, _train_epoch, make_step, prepare_training, run_concurrently

SHAPES = {  # name: (C, H, W, training images, classes) -- CIFAR10 6 known classes, TinyImageNet 20
    'cifar': (3, 32, 32, 30_000, 6),
    'tiny': (3, 64, 64, 10_000, 20),
}
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def synthetic(shape, n_scale=1.0, seed=0):
    "Random uint8 images (N x C x H x W) and labels of a named shape; N scaled by n_scale."
    C, H, W, n, k = SHAPES[shape]
    n = max(256, int(n * n_scale))
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, C, H, W), dtype=torch.uint8, generator=g),
                    torch.randint(0, k, (n,), generator=g)), k


class PILDataset(Dataset):
    "The reference code's data path: a uint8 array held as H x W x C, returned as PIL images through transforms."
    def __init__(self, images: ImageSet, transform):
        self.x, self.y, self.transform = images.x.permute(0, 2, 3, 1).numpy(), images.y.tolist(), transform
    def __len__(self): return len(self.y)
    def __getitem__(self, i): return self.transform(Image.fromarray(self.x[i])), self.y[i]


def reference_loader(images, batch_size, workers, device, seed=0):
    "DataLoader of the reference pipeline (shuffled, augmented, float32 normalised on the CPU)."
    size = images.x.shape[-1]
    tf = T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    return DataLoader(PILDataset(images, tf), batch_size, shuffle=True, num_workers=workers, drop_last=True,
                      pin_memory=device.type == 'cuda', persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def forever(loader):
    "Batches from successive epochs of a DataLoader."
    while True: yield from loader


class Steps:
    "`batches`-like object for pmal.train._train_epoch: `n` full batches continuing over DeviceBatches epochs."
    def __init__(self, batches):
        self.batches, self.n, self.e = batches, 0, 0
        self.it = self._gen()
    def _gen(self):
        while True:
            for x, y in self.batches.epoch(self.e):
                if len(y) == self.batches.batch_size: yield x, y  # full batches only (no recompiles)
            self.e += 1
    def take(self, n): self.n = n; return self
    def __len__(self): return self.n
    def epoch(self, e):
        for _ in range(self.n): yield next(self.it)


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def setup_model(name, k, device, recipe, seed=0, compile_mode=None):
    "Model, optimizer and the training step (maybe compiled or graphed), as pmal.train.fit sets them up."
    torch.manual_seed(seed)
    model, crit = create_model(name, k, 3), SoftmaxCriterion()
    opt = prepare_training(model, crit, replace(recipe, seed=seed), device)[0]
    if compile_mode in (None, False, True): net = torch.compile(model) if recipe.compile else model
    else: net = torch.compile(model, mode=compile_mode)
    return model, opt, make_step(net, crit, opt, recipe, device)


def timed(run_steps, warmup, args, device):
    "Warm up, calibrate, then time `run_steps(n)`; returns (steps, seconds)."
    run_steps(warmup); sync(device)
    t0 = time.perf_counter(); run_steps(args.calib); sync(device)
    per_step = (time.perf_counter() - t0) / args.calib
    steps = int(min(args.steps, max(args.min_steps, args.seconds / max(per_step, 1e-6))))
    t0 = time.perf_counter(); run_steps(steps); sync(device)
    return steps, time.perf_counter() - t0


def bench_reference(model_name, images, k, args, device):
    "Images/s of the reference pipeline (reference loop: float32, loss.item() every step)."
    recipe = Recipe(lr=args.lr)
    model, opt, _ = setup_model(model_name, k, device, recipe)
    model.train()
    batches = forever(reference_loader(images, args.batch_size, args.workers, device))
    def run_steps(n):
        for _ in range(n):
            x, y = next(batches)
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            _, logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            opt.step()
            loss.item()
    return timed(run_steps, args.warmup, args, device)


def fast_recipe(args, amp, channels_last, compile_, cuda_graph):
    "The Recipe of a fast pipeline's flags (a torch.compile mode string is applied by setup_model instead)."
    return Recipe(lr=args.lr, amp=amp, channels_last=channels_last, compile=compile_ is True, cuda_graph=cuda_graph,
                  batch_size=args.batch_size)


def fast_steps(model_name, images, k, args, device, flags, seed=0):
    "A function running n steps of DeviceBatches + pmal.train's epoch loop with the pipeline's recipe flags."
    recipe = fast_recipe(args, *flags)
    _, _, step = setup_model(model_name, k, device, recipe, seed, flags[2])
    steps = Steps(DeviceBatches(images, args.batch_size, shuffle=True, augment='crop_flip', mean=MEAN, std=STD,
                                device=device, seed=seed))
    return lambda n: _train_epoch(step, steps.take(n), 0, device, False)


def bench_fast(model_name, images, k, args, device, *flags):
    "Images/s of DeviceBatches + pmal.train's epoch loop with the given recipe flags."
    warmup = args.warmup + (args.compile_warmup if flags[2] else 0)
    return timed(fast_steps(model_name, images, k, args, device, flags), warmup, args, device)


def bench_step_only(model_name, images, k, args, device):
    "Images/s of fast_stepgraph's step alone, on one fixed batch: the bound without the data path and epoch loop."
    _, _, step = setup_model(model_name, k, device, fast_recipe(args, *PIPELINES['fast_stepgraph']))
    x, y = next(iter(DeviceBatches(images, args.batch_size, shuffle=True, augment='crop_flip', mean=MEAN, std=STD,
                                   device=device).epoch(0)))
    x = x.contiguous(memory_format=torch.channels_last)
    def run_steps(n):
        for _ in range(n): step(x, y)
    return timed(run_steps, args.warmup, args, device)


PIPELINES = dict(  # (amp, channels_last, compile, cuda_graph)
    reference=None, fast_fp32=(False, False, False, False), fast=(True, True, False, False),
    fast_compile=(True, True, True, False), fast_graphs=(True, True, 'reduce-overhead', False),
    fast_stepgraph=(True, True, False, True), fast_compile_stepgraph=(True, True, True, True), step_only='fast_stepgraph on one fixed batch')
COMPILED = ('fast_compile', 'fast_graphs', 'fast_compile_stepgraph')


def environment(device):
    gpu = torch.cuda.get_device_name(device) if device.type == 'cuda' else None
    return dict(gpu=gpu, cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                torch=torch.__version__, python=platform.python_version(),
                date=datetime.now(timezone.utc).isoformat(timespec='seconds'), host=platform.node())


def write_json(args, env, rows, conc):
    "Write what is measured so far (atomically), so a run stopped by a time limit keeps its figures."
    if not args.json: return
    write_json_atomic(dict(environment=env, argv=sys.argv[1:], args=vars(args), rows=rows, concurrent=conc), args.json)


def run_matrix(args, device, save=lambda rows: None):
    rows, ref_ips = [], {}
    for shape in args.shapes:
        images, k = synthetic(shape, args.n_scale)
        n = len(images)
        for model_name in args.models:
            for pipe in args.pipelines:
                if pipe in COMPILED and model_name not in args.compile_models: continue
                t_start = time.perf_counter()
                try:
                    if pipe == 'reference': steps, secs = bench_reference(model_name, images, k, args, device)
                    elif pipe == 'step_only': steps, secs = bench_step_only(model_name, images, k, args, device)
                    else: steps, secs = bench_fast(model_name, images, k, args, device, *PIPELINES[pipe])
                    torch._dynamo.reset()
                except Exception as e:  # keep the other configurations' figures
                    print(f"[{pipe} {model_name} {shape}] failed: {type(e).__name__}: {e}", flush=True)
                    continue
                ips = steps * args.batch_size / secs
                if pipe == 'reference': ref_ips[(shape, model_name)] = ips
                ref = ref_ips.get((shape, model_name))
                row = dict(pipeline=pipe, model=model_name, shape=shape, image_shape=list(images.x.shape[1:]),
                           n_train=n, batch_size=args.batch_size, timed_steps=steps, seconds=secs, images_per_s=ips,
                           epoch_s=n / ips, ratio_vs_reference=None if ref is None else ips / ref,
                           wall_s=time.perf_counter() - t_start,
                           workers=args.workers if pipe == 'reference' else 0)
                rows.append(row)
                save(rows)
                print(fmt_row(row), flush=True)
                if device.type == 'cuda': torch.cuda.empty_cache()
    return rows


def fmt_row(r):
    ratio = '-' if r['ratio_vs_reference'] is None else f"{r['ratio_vs_reference']:.2f}x"
    return (f"{r['pipeline']:<13} {r['model']:<12} {r['shape']:<6} {r['images_per_s']:>10.0f} img/s  "
            f"epoch {r['epoch_s']:>8.2f} s  ratio {ratio:>7}  ({r['timed_steps']} steps)")


# ---- phase 1's U models: one after the other vs at once --------------------------------------------------
def _u_runs(args, device, n_models, seed0):
    "For each of `n_models` models (warmed up): a function training it for the timed steps."
    images, k = synthetic(args.shapes[0], args.n_scale)
    runs = []
    for m in range(n_models):
        run_steps = fast_steps(args.models[0], images, k, args, device, PIPELINES[args.u_pipeline], seed=seed0 + m)
        run_steps(args.warmup)
        runs.append(lambda run_steps=run_steps: run_steps(args.u_steps))
    sync(device)
    return runs


def _u_worker(rank, args, device_str, n_models, barrier, queue):
    "Train `n_models` models (one after another) for the timed steps; report (start, end) of the timed part."
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 4))
    device = torch.device(device_str)
    runs = _u_runs(args, device, n_models, rank)
    barrier.wait()
    t0 = time.monotonic()
    for run in runs:
        run(); sync(device)
    queue.put((rank, t0, time.monotonic()))


def _u_threads(args, device):
    "(start, end) of the timed steps of U models trained at once by pmal.train.run_concurrently in this process."
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 4))  # as in each _u_worker process
    runs = _u_runs(args, device, args.concurrent, 0)
    t0 = time.monotonic()
    run_concurrently(runs, device)
    sync(device)
    return [(0, t0, time.monotonic())]


def run_concurrent(args, device):
    "Wall time of U models trained one after the other (one process) vs U processes at once vs U threads at once."
    import torch.multiprocessing as mp
    ctx = mp.get_context('spawn')
    U, out = args.concurrent, {}
    for mode, procs, per_proc in (('sequential', 1, U), ('processes', U, 1), ('threads', 0, U)):
        if procs:
            barrier, queue = ctx.Barrier(procs), ctx.SimpleQueue()
            ps = [ctx.Process(target=_u_worker, args=(r, args, str(device), per_proc, barrier, queue)) for r in range(procs)]
            for p in ps: p.start()
            res = [queue.get() for _ in ps]
            for p in ps: p.join()
        else:
            try: res = _u_threads(args, device)
            except Exception as e:
                print(f"U={U} threads failed: {type(e).__name__}: {e}", flush=True)
                continue
        wall = max(e for _, _, e in res) - min(s for _, s, _ in res)
        out[mode] = dict(wall_s=wall, images_per_s=U * args.u_steps * args.batch_size / wall)
        print(f"U={U} {args.models[0]} {args.shapes[0]} {args.u_pipeline} {mode:<10}: {U} x {args.u_steps} steps in "
              f"{wall:.2f} s ({out[mode]['images_per_s']:.0f} img/s over all models)", flush=True)
    for mode in ('processes', 'threads'):
        if mode in out:
            out[f'speedup_{mode}'] = out['sequential']['wall_s'] / out[mode]['wall_s']
            print(f"U={U} {mode} speedup: {out[f'speedup_{mode}']:.2f}x", flush=True)
    return dict(U=U, model=args.models[0], shape=args.shapes[0], pipeline=args.u_pipeline,
                steps_per_model=args.u_steps, **out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--models', nargs='+', default=['classifier32', 'wrn40_4'])
    p.add_argument('--shapes', nargs='+', default=['cifar', 'tiny'], choices=list(SHAPES))
    p.add_argument('--pipelines', nargs='+', default=['reference', 'fast_fp32', 'fast', 'fast_stepgraph'],
                   choices=list(PIPELINES))
    p.add_argument('--compile-models', nargs='*', default=['classifier32'], help='models timed with torch.compile')
    p.add_argument('--n-scale', type=float, default=1.0, help='fraction of the 30,000 / 10,000 training images')
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--steps', type=int, default=300, help='most timed steps per configuration')
    p.add_argument('--min-steps', type=int, default=20)
    p.add_argument('--seconds', type=float, default=3.0, help='target timed seconds per configuration')
    p.add_argument('--warmup', type=int, default=15)
    p.add_argument('--calib', type=int, default=5, help='steps timed to choose the number of timed steps')
    p.add_argument('--compile-warmup', type=int, default=10, help='extra warm-up steps under torch.compile')
    p.add_argument('--workers', type=int, default=8, help='DataLoader workers of the reference pipeline')
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--no-cudnn-benchmark', action='store_true', help='leave torch.backends.cudnn.benchmark off')
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    p.add_argument('--concurrent', type=int, default=0, help='also time U phase-1 models one after another vs at once')
    p.add_argument('--u-steps', type=int, default=200, help='timed steps per model in the --concurrent test')
    p.add_argument('--u-pipeline', default='fast', choices=['fast', 'fast_stepgraph', 'fast_fp32'],
                   help='pipeline of the --concurrent test')
    p.add_argument('--skip-matrix', action='store_true', help='only the --concurrent test')
    p.add_argument('--json', help='write the results (environment, rows, concurrent) to this JSON file')
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads: torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark  # the reference code sets it; same for every pipeline
    env = environment(device)
    print(json.dumps(env), flush=True)
    rows = [] if args.skip_matrix else run_matrix(args, device, lambda rows: write_json(args, env, rows, None))
    conc = run_concurrent(args, device) if args.concurrent >= 2 else None
    write_json(args, env, rows, conc)
    print('\npipeline      model        shape       images/s   epoch time        ratio vs reference')
    for r in rows: print(fmt_row(r))


if __name__ == '__main__':
    main()
