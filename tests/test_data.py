"""pmal.data: every loader on tiny files written in the data set's real on-disk format, plus batching."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from pmal.batches import DeviceBatches, LoaderBatches, crop_flip, make_batches
from pmal.data import BENCHMARKS, OSR_SPLITS, DataNotFoundError, ImageSet, OpenSetSplit, load_openset

torch.set_num_threads(1)
RNG = np.random.default_rng(0)


# ---------- writers: the real formats ----------

def _images_with_class(labels, shape, layout='NCHW'):
    "Random uint8 images whose first byte (pixel 0,0 of channel 0) is the class id."
    x = RNG.integers(0, 256, (len(labels), *shape), dtype=np.uint8)
    if layout == 'NCHW': x[:, 0, 0, 0] = labels
    elif layout == 'NHWC': x[:, 0, 0, 0] = labels
    else: x[:, 0, 0] = labels
    return x

def write_idx(path, arr, gz=True):
    "MNIST idx format: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian int32 dims, raw bytes."
    head = struct.pack('>BBBB', 0, 0, 0x08, arr.ndim) + struct.pack(f'>{arr.ndim}i', *arr.shape)
    data = head + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + '.gz', 'wb') as f: f.write(data)
    else: path.write_bytes(data)

def write_mnist(root, gz=True, n_train=3, n_test=2):
    raw = root / 'MNIST' / 'raw'; raw.mkdir(parents=True)
    for prefix, n in (('train', n_train), ('t10k', n_test)):
        y = np.repeat(np.arange(10), n)
        write_idx(raw / f'{prefix}-images-idx3-ubyte', _images_with_class(y, (28, 28), 'NHW'), gz)
        write_idx(raw / f'{prefix}-labels-idx1-ubyte', y, gz)
    return raw

def _pickle(path, obj):
    with open(path, 'wb') as f: pickle.dump(obj, f, protocol=2)

CIFAR10_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']

def write_cifar10(root):
    "cifar-10-batches-py: data_batch_1..5 and test_batch (data N x 3072 uint8, labels), batches.meta."
    d = root / 'cifar-10-batches-py'; d.mkdir(parents=True)
    for name, per in [(f'data_batch_{i}', 1) for i in range(1, 6)] + [('test_batch', 2)]:
        y = np.repeat(np.arange(10), per)
        x = _images_with_class(y, (3, 32, 32)).reshape(len(y), 3072)
        _pickle(d / name, {'batch_label': name, 'labels': y.tolist(), 'data': x,
                           'filenames': [f'{i}.png' for i in range(len(y))]})
    _pickle(d / 'batches.meta', {'label_names': CIFAR10_NAMES, 'num_cases_per_batch': 10, 'num_vis': 3072})

def write_cifar100(root):
    "cifar-100-python: train, test (fine_labels, coarse_labels), meta (fine_label_names)."
    d = root / 'cifar-100-python'; d.mkdir(parents=True)
    for name, per in (('train', 1), ('test', 2)):
        y = np.repeat(np.arange(100), per)
        x = _images_with_class(y, (3, 32, 32)).reshape(len(y), 3072)
        _pickle(d / name, {'data': x, 'fine_labels': y.tolist(), 'coarse_labels': (y // 5).tolist(),
                           'filenames': [f'{i}.png' for i in range(len(y))], 'batch_label': name})
    _pickle(d / 'meta', {'fine_label_names': [f'c100_{i}' for i in range(100)],
                         'coarse_label_names': [f'super_{i}' for i in range(20)]})

def write_svhn(root, per=2):
    "svhn/{train,test}_32x32.mat: X (32, 32, 3, N) uint8, y (N, 1) with label 10 for digit 0."
    d = root / 'svhn'; d.mkdir(parents=True)
    for name in ('train', 'test'):
        digits = np.repeat(np.arange(10), per)
        x = _images_with_class(digits, (3, 32, 32))                       # N x C x H x W
        y = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]
        scipy.io.savemat(d / f'{name}_32x32.mat', {'X': x.transpose(2, 3, 1, 0), 'y': y})

def _jpeg(path, value, size=64, mode='RGB', noise=False):
    "A JPEG of a grey square of `value`, or of random pixels when `noise`."
    path.parent.mkdir(parents=True, exist_ok=True)
    if noise: img = Image.fromarray(RNG.integers(0, 256, (size, size, 3), dtype=np.uint8))
    else: img = Image.new(mode, (size, size), value if mode == 'L' else (value, value, value))
    img.save(path, quality=95)

TINY_WNIDS = [f'n{(i * 7919) % 100000:08d}' for i in range(200)]   # not written in sorted order

def write_tiny(root, val_per=1):
    "tiny-imagenet-200 in its real layout; every image is a grey square of value (sorted index of its wnid)."
    base = root / 'tiny-imagenet-200'
    base.mkdir(parents=True)
    (base / 'wnids.txt').write_text('\n'.join(TINY_WNIDS) + '\n')
    (base / 'words.txt').write_text(''.join(f'{w}\tthing {w}, other name\n' for w in TINY_WNIDS))
    index = {w: i for i, w in enumerate(sorted(TINY_WNIDS))}
    ann = []
    for w in TINY_WNIDS:
        for j in range(2):
            # like the real data, some JPEGs are greyscale (one channel)
            _jpeg(base / 'train' / w / 'images' / f'{w}_{j}.JPEG', index[w], mode='L' if j == 1 else 'RGB')
        (base / 'train' / w / f'{w}_boxes.txt').write_text('')
        for j in range(val_per):
            f = f'val_{len(ann)}.JPEG'
            _jpeg(base / 'val' / 'images' / f, index[w])
            ann.append(f'{f}\t{w}\t0\t0\t63\t63')
    (base / 'val' / 'val_annotations.txt').write_text('\n'.join(ann) + '\n')
    return base


# ---------- fixtures ----------

@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny'); write_tiny(root); return root

def trusted(root, folder):
    "Declare the tiny CIFAR files of a test trusted: their md5 joins pmal.readers.KNOWN_MD5 (the published files' md5)."
    import hashlib, pmal.readers
    for f in (root / folder).iterdir():
        pmal.readers.KNOWN_MD5[f'{folder}/{f.name}'] = hashlib.md5(f.read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def cifar_root(tmp_path_factory):
    import pmal.readers
    saved = dict(pmal.readers.KNOWN_MD5)
    root = tmp_path_factory.mktemp('cifar'); write_cifar10(root); write_cifar100(root)
    trusted(root, 'cifar-10-batches-py'); trusted(root, 'cifar-100-python')
    yield root
    pmal.readers.KNOWN_MD5.clear(); pmal.readers.KNOWN_MD5.update(saved)

@pytest.fixture(scope='module')
def imagenet_root(tmp_path_factory):
    "imagenet/{train,val}/<wnid>/*.JPEG for 103 wnids, 1 small image each."
    root = tmp_path_factory.mktemp('imagenet')
    wnids = [f'n{i:08d}' for i in range(103)]
    for part in ('train', 'val'):
        for i, w in enumerate(wnids): _jpeg(root / 'imagenet' / part / w / f'{w}_0.JPEG', i, size=12, noise=True)
    return root


# ---------- digits ----------

def test_digits_split0():
    ds = load_openset('digits')
    assert isinstance(ds, OpenSetSplit) and ds.name == 'digits' and ds.split == 0
    assert ds.known_classes == [2, 4, 5, 9, 8, 3] and ds.num_classes == 6
    assert len(ds.train) + len(ds.test_known) + len(ds.test_unknown) == 646 + 719
    assert len(ds.test_known) + len(ds.test_unknown) == 719                    # 40% of 1797
    assert ds.unknown_classes == [0, 1, 6, 7] and len(ds.unknown_names) == 4
    assert ds.train.x.dtype == torch.uint8 and ds.train.x.shape[1:] == (1, 8, 8)
    assert int(ds.train.x.max()) == 255 and ds.train.y.unique().tolist() == list(range(6))
    assert ds.image_shape == (1, 8, 8) and ds.augment == 'none' and len(ds.mean) == 1


def test_digits_fixed_and_splits_differ():
    a, b = load_openset('digits', 2), load_openset('digits', 2)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert a.known_classes == OSR_SPLITS['mnist'][2]
    assert load_openset('digits', 1).known_classes != a.known_classes


def test_registry_names_and_splits():
    assert set(BENCHMARKS) == {'mnist', 'svhn', 'cifar10', 'cifar+10', 'cifar+50', 'tinyimagenet', 'imagenet100',
                               'imagenet200', 'imagenet_lt', 'digits'}
    for name in ('mnist', 'svhn', 'cifar10', 'cifar+10', 'cifar+50', 'tinyimagenet', 'digits'):
        assert len(BENCHMARKS[name].splits) == 5, name
    assert BENCHMARKS['svhn'].augment == 'crop' and BENCHMARKS['cifar10'].augment == 'crop_flip'
    assert BENCHMARKS['mnist'].augment == 'none'


# ---------- MNIST ----------

@pytest.mark.parametrize('gz', [True, False])
def test_mnist_idx(tmp_path, gz):
    raw = write_mnist(tmp_path, gz=gz)
    ds = load_openset('mnist', split=1, root=tmp_path)
    known = OSR_SPLITS['mnist'][1]
    assert ds.known_classes == known and ds.image_shape == (1, 28, 28)
    assert len(ds.train) == 6 * 3 and len(ds.test_known) == 6 * 2 and len(ds.test_unknown) == 4 * 2
    assert torch.equal(ds.train.x[:, 0, 0, 0].long(), torch.tensor(known)[ds.train.y])    # remapped labels
    assert torch.equal(ds.test_known.x[:, 0, 0, 0].long(), torch.tensor(known)[ds.test_known.y])
    assert sorted(set(ds.test_unknown.y.tolist())) == sorted(set(range(10)) - set(known))
    assert torch.equal(ds.test_unknown.x[:, 0, 0, 0].long(), ds.test_unknown.y)           # original ids
    assert (raw / 'train-images-idx3-ubyte').exists()                                     # .gz decompressed


def test_mnist_missing_file(tmp_path):
    raw = write_mnist(tmp_path)
    os.remove(raw / 't10k-labels-idx1-ubyte.gz')
    with pytest.raises(DataNotFoundError, match=r"mnist: .*t10k-labels-idx1-ubyte.*download=True"):
        load_openset('mnist', root=tmp_path)


def test_pmal_data_env(tmp_path, monkeypatch):
    write_mnist(tmp_path)
    monkeypatch.setenv('PMAL_DATA', str(tmp_path))
    assert len(load_openset('mnist').train) == 18
    monkeypatch.delenv('PMAL_DATA')
    with pytest.raises(DataNotFoundError, match='PMAL_DATA'):
        load_openset('mnist')


# ---------- SVHN ----------

def test_svhn_mat_label10_is_zero(tmp_path):
    write_svhn(tmp_path)
    ds = load_openset('svhn', split=3, root=tmp_path)                 # split 3 knows digit 0
    known = OSR_SPLITS['svhn'][3]
    assert known.index(0) == 4 and ds.augment == 'crop' and ds.image_shape == (3, 32, 32)
    assert len(ds.train) == 12 and len(ds.test_unknown) == 8
    assert torch.equal(ds.train.x[:, 0, 0, 0].long(), torch.tensor(known)[ds.train.y])
    assert (ds.train.y == 4).sum() == 2 and set(ds.train.x[ds.train.y == 4, 0, 0, 0].tolist()) == {0}


# ---------- CIFAR ----------

def test_cifar10(cifar_root):
    ds = load_openset('cifar10', split=2, root=cifar_root)
    known = OSR_SPLITS['cifar10'][2]
    assert ds.class_names == [CIFAR10_NAMES[k] for k in known] and ds.augment == 'crop_flip'
    assert len(ds.train) == 6 * 5 and len(ds.test_known) == 12 and len(ds.test_unknown) == 8
    assert torch.equal(ds.train.x[:, 0, 0, 0].long(), torch.tensor(known)[ds.train.y])
    assert ds.unknown_names == [CIFAR10_NAMES[k] for k in sorted(set(range(10)) - set(known))]


@pytest.mark.parametrize('n', [10, 50])
def test_cifar_plus(cifar_root, n):
    ds = load_openset(f'cifar+{n}', split=4, root=cifar_root)
    known, unknown = OSR_SPLITS['cifar+_known'][4], OSR_SPLITS[f'cifar+{n}_unknown'][4]
    assert ds.known_classes == known and ds.num_classes == 4
    assert len(ds.train) == 4 * 5 and len(ds.test_known) == 4 * 2
    assert len(ds.test_unknown) == 2 * n                              # the split's CIFAR100 test images only
    assert sorted(set(ds.test_unknown.y.tolist())) == sorted(unknown) == ds.unknown_classes
    assert torch.equal(ds.test_unknown.x[:, 0, 0, 0].long(), ds.test_unknown.y)
    assert ds.unknown_names == [f'c100_{k}' for k in sorted(unknown)]


def test_cifar_plus_needs_cifar100(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(DataNotFoundError, match=r"cifar\+10: .*cifar-100-python"):
        load_openset('cifar+10', root=tmp_path)


# ---------- TinyImageNet ----------

def test_tinyimagenet_layout(tiny_root):
    ds = load_openset('tinyimagenet', split=0, root=tiny_root)
    known = OSR_SPLITS['tinyimagenet'][0]
    assert ds.image_shape == (3, 64, 64) and ds.num_classes == 20
    assert len(ds.train) == 40 and len(ds.test_known) == 20 and len(ds.test_unknown) == 180
    # each image is a grey square whose value is its class's index in the sorted wnid list (JPEG: +-2)
    assert (ds.train.x.float().mean((1, 2, 3)) - torch.tensor(known)[ds.train.y].float()).abs().max() < 3
    assert (ds.test_unknown.x.float().mean((1, 2, 3)) - ds.test_unknown.y.float()).abs().max() < 3
    assert ds.unknown_classes == sorted(set(range(200)) - set(known))
    assert ds.class_names[0] == f'thing {sorted(TINY_WNIDS)[known[0]]}'


def test_tinyimagenet_missing_annotations(tmp_path):
    base = tmp_path / 'tiny-imagenet-200'; (base / 'train').mkdir(parents=True); (base / 'val' / 'images').mkdir(parents=True)
    (base / 'wnids.txt').write_text('\n'.join(TINY_WNIDS))
    with pytest.raises(DataNotFoundError, match=r"tinyimagenet: .*val_annotations.txt.*tiny-imagenet-200.zip"):
        load_openset('tinyimagenet', root=tmp_path)


def test_tinyimagenet_too_few_wnids(tmp_path):
    base = tmp_path / 'tiny-imagenet-200'
    for p in ('train', 'val/images'): (base / p).mkdir(parents=True)
    (base / 'val' / 'val_annotations.txt').write_text('')
    (base / 'wnids.txt').write_text('\n'.join(TINY_WNIDS[:50]))
    with pytest.raises(DataNotFoundError, match='lists 50 wnids, expected 200'):
        load_openset('tinyimagenet', root=tmp_path)


# ---------- ImageNet-scale ----------

def test_imagenet100_folder(imagenet_root):
    ds = load_openset('imagenet100', root=imagenet_root)
    assert ds.num_classes == 100 and len(ds.train) == 100 and len(ds.test_known) == 100 and len(ds.test_unknown) == 3
    img, y = ds.train[7]
    assert isinstance(img, Image.Image) and y == 7
    assert [ds.test_unknown[i][1] for i in range(3)] == [100, 101, 102] == ds.unknown_classes
    b = make_batches(ds.train, ds, 4, train=True, seed=0, num_workers=0)
    assert isinstance(b, LoaderBatches) and len(b) == 25
    x, y = next(iter(b.epoch(0)))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    with pytest.raises(ValueError, match=r'valid splits: \[0\]'):
        load_openset('imagenet100', split=1, root=imagenet_root)
    with pytest.raises(DataNotFoundError, match='has 103 class folders'):
        load_openset('imagenet200', root=imagenet_root)


def test_loader_batches_replay(imagenet_root):
    ds = load_openset('imagenet100', root=imagenet_root)
    sub = torch.utils.data.Subset(ds.train, range(6))
    mk = lambda w: LoaderBatches(sub, 3, shuffle=True, augment='crop_flip', mean=ds.mean, std=ds.std, seed=5,
                                 image_size=32, num_workers=w)
    run = lambda b, e: [t for x, y in b.epoch(e) for t in (x, y)]
    a, again, workers = run(mk(0), 1), run(mk(0), 1), run(mk(2), 1)
    assert all(torch.equal(p, q) for p, q in zip(a, again))
    assert all(torch.equal(p, q) for p, q in zip(a, workers))          # same batches whatever the worker count
    assert not all(torch.equal(p, q) for p, q in zip(a, run(mk(0), 2)))
    fixed = lambda e: torch.cat([x for x, _ in LoaderBatches(sub, 3, shuffle=False, augment='crop_flip', mean=ds.mean,
                                                            std=ds.std, seed=5, image_size=32, num_workers=0).epoch(e)])
    assert not torch.equal(fixed(1), fixed(2))                         # augmentation is drawn anew each epoch


def test_imagenet_lt_lists(tmp_path):
    folder = tmp_path / 'imagenet_lt'
    wn = ['n01440764', 'n01443537', 'n01484850']
    lines = {'train': [], 'test': [], 'open': []}
    for k, w in enumerate(wn):
        for j in range(3 - k):                                         # long-tailed: 3, 2, 1 images
            _jpeg(folder / 'train' / w / f'{w}_{j}.JPEG', k, size=10); lines['train'].append(f'train/{w}/{w}_{j}.JPEG {k}')
        _jpeg(folder / 'val' / f'val_{k}.JPEG', k, size=10); lines['test'].append(f'val/val_{k}.JPEG {k}')
    _jpeg(folder / 'open' / 'n09999999' / 'x.JPEG', 9, size=10); lines['open'].append('open/n09999999/x.JPEG -1')
    for p, l in lines.items(): (folder / f'ImageNet_LT_{p}.txt').write_text('\n'.join(l) + '\n')
    ds = load_openset('imagenet_lt', root=tmp_path)
    assert ds.known_classes == [0, 1, 2] and ds.class_names == wn
    assert len(ds.train) == 6 and len(ds.test_known) == 3 and len(ds.test_unknown) == 1
    assert ds.train[5][1] == 2 and isinstance(ds.test_unknown[0][0], Image.Image)
    os.remove(folder / 'ImageNet_LT_open.txt')
    with pytest.raises(DataNotFoundError, match=r'imagenet_lt: .*ImageNet_LT_open.txt.*OpenLongTailRecognition'):
        load_openset('imagenet_lt', root=tmp_path)


# ---------- npz ----------

def _npz(path, nhwc=False, **extra):
    shape = (6, 6, 3) if nhwc else (6, 6)
    y_tr, y_te = np.repeat(np.arange(5), 4), np.repeat(np.arange(5), 2)
    x_tr = _images_with_class(y_tr, shape, 'NHWC' if nhwc else 'NHW')
    x_te = _images_with_class(y_te, shape, 'NHWC' if nhwc else 'NHW')
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, **extra)
    return path


def test_npz_known_in_file(tmp_path):
    p = _npz(tmp_path / 'd.npz', known=np.array([[3, 1], [0, 4]]), class_names=np.array(list('abcde')))
    ds = load_openset(f'npz:{p}', split=1)
    assert ds.known_classes == [0, 4] and ds.class_names == ['a', 'e'] and ds.image_shape == (1, 6, 6)
    assert len(ds.train) == 8 and len(ds.test_known) == 4 and len(ds.test_unknown) == 6
    assert torch.equal(ds.train.x[:, 0, 0, 0].long(), torch.tensor([0, 4])[ds.train.y])
    assert ds.unknown_classes == [1, 2, 3] and ds.augment == 'none'
    xk = ds.train.x.double() / 255
    assert abs(ds.mean[0] - xk.mean().item()) < 1e-6 and abs(ds.std[0] - xk.std().item()) < 1e-6
    with pytest.raises(ValueError, match=r'split 2 not in 0..1'):
        load_openset(f'npz:{p}', split=2)


def test_npz_nhwc_known_argument(tmp_path):
    p = _npz(tmp_path / 'd.npz', nhwc=True)
    ds = load_openset(f'npz:{p}', known_classes=[2, 1, 0])
    assert ds.image_shape == (3, 6, 6) and len(ds.mean) == 3 and ds.class_names == ['2', '1', '0']
    assert torch.equal(ds.test_known.x[:, 0, 0, 0].long(), torch.tensor([2, 1, 0])[ds.test_known.y])


def test_npz_errors(tmp_path):
    p = _npz(tmp_path / 'd.npz')
    with pytest.raises(ValueError, match=r"no known classes. Pass known_classes=.*0..4"):
        load_openset(f'npz:{p}')
    with pytest.raises(ValueError, match=r'unknown class ids \[7\]'):
        load_openset(f'npz:{p}', known_classes=[1, 7])
    with pytest.raises(DataNotFoundError, match='file not found'):
        load_openset(f'npz:{tmp_path}/nope.npz', known_classes=[1])
    np.savez(tmp_path / 'bad.npz', x_train=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"lacks arrays \['y_train', 'x_test', 'y_test'\]"):
        load_openset(f'npz:{tmp_path}/bad.npz', known_classes=[0])


# ---------- bad requests ----------

def test_bad_requests(tmp_path):
    with pytest.raises(ValueError, match=r"unknown data set 'cifar100'; valid: .*'tinyimagenet'.*npz"):
        load_openset('cifar100', root=tmp_path)
    with pytest.raises(ValueError, match=r'cifar10: split 5 not valid; valid splits: \[0, 1, 2, 3, 4\]'):
        load_openset('cifar10', split=5, root=tmp_path)
    with pytest.raises(ValueError, match=r'split -1 not valid'):
        load_openset('digits', split=-1)
    with pytest.raises(ValueError, match=r'unknown class ids \[10\]. Valid class ids: 0..9'):
        load_openset('digits', known_classes=[3, 10])
    with pytest.raises(ValueError, match='repeats a class'):
        load_openset('digits', known_classes=[3, 3])
    with pytest.raises(ValueError, match='unknown class ids \\[200\\]. Valid class ids: 0..199'):
        load_openset('tinyimagenet', known_classes=[200], root=tmp_path)
    with pytest.raises(DataNotFoundError, match=r"cifar10: data root '.*missing' does not exist"):
        load_openset('cifar10', root=tmp_path / 'missing')
    with pytest.raises(DataNotFoundError, match=r"svhn: .*train_32x32.mat.*download=True"):
        load_openset('svhn', root=tmp_path)


# ---------- issue 12: a bad .npz fails when it is read, naming the file; no planted pickle runs ----------

def _npz_parts(n_classes=4, per=3, shape=(6, 6)):
    y_tr, y_te = np.repeat(np.arange(n_classes), per), np.repeat(np.arange(n_classes), 2)
    return dict(x_train=_images_with_class(y_tr, shape, 'NHW'), y_train=y_tr,
                x_test=_images_with_class(y_te, shape, 'NHW'), y_test=y_te)


BAD_NPZ = {  # case: (arrays changed, known row, what the message says)
    'a known class without training image': (dict(y_train=np.repeat([0, 1, 2, 2], 3)), [0, 1, 3], 'known class(es) [3] have no training image'),
    'a single known class': ({}, [2], 'at least 2 known classes'),
    'no unknown test image': ({}, [0, 1, 2, 3], 'no unknown test image'),
    'string labels': (dict(y_train=np.repeat(list('abcd'), 3)), [0, 1], 'y_train must hold integer class ids'),
    'images N x 3': (dict(x_train=np.zeros((12, 3), np.uint8), x_test=np.zeros((8, 3), np.uint8)), [0, 1], 'N x H x W'),
    'images N x 3 x 1': (dict(x_train=np.zeros((12, 3, 1), np.uint8), x_test=np.zeros((8, 3, 1), np.uint8)), [0, 1], 'too small'),
    'channels first': (dict(x_train=np.zeros((12, 3, 6, 6), np.uint8), x_test=np.zeros((8, 3, 6, 6), np.uint8)), [0, 1],
                       'move the channels last'),
    'a label per image missing': (dict(y_train=np.repeat(np.arange(4), 3)[:-1]), [0, 1], 'one label per image'),
    'float images': (dict(x_train=np.zeros((12, 6, 6), np.float32)), [0, 1], 'must be uint8'),
    'negative labels': (dict(y_test=np.repeat(np.arange(4), 2) - 1), [0, 1], 'negative class ids'),
}


def write_bad_npz(path, case):
    change, known, _ = BAD_NPZ[case]
    np.savez(path, **{**_npz_parts(), **change}, known=np.array(known))
    return path


@pytest.mark.parametrize('case', list(BAD_NPZ))
def test_a_bad_npz_fails_when_read_naming_file_and_problem(tmp_path, case):
    path = write_bad_npz(tmp_path / 'bad.npz', case)
    with pytest.raises(ValueError) as e:
        load_openset(f'npz:{path}')
    assert BAD_NPZ[case][2] in str(e.value) and str(path) in str(e.value)


def test_an_npz_split_that_is_not_there_is_refused(tmp_path):
    np.savez(tmp_path / 'one.npz', **_npz_parts(), known=np.array([0, 1]))
    assert len(load_openset(f'npz:{tmp_path}/one.npz').train) == 6
    with pytest.raises(ValueError, match=r'split 3 not in 0..0'):
        load_openset(f'npz:{tmp_path}/one.npz', split=3)


def test_custom_known_classes_need_two_and_leave_one_unknown():
    with pytest.raises(ValueError, match='at least 2 known classes'):
        load_openset('digits', known_classes=[3])
    with pytest.raises(ValueError, match='no class is left to be unknown'):
        load_openset('digits', known_classes=list(range(10)))


class _Plant:
    "Unpickling this calls open(marker, 'w'): a harmless stand-in for code a planted pickle would run."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (open, (self.marker, 'w'))


@pytest.mark.parametrize('name', ['cifar10', 'cifar+10'])
def test_a_planted_cifar_pickle_is_never_unpickled(tmp_path, name):
    write_cifar10(tmp_path); write_cifar100(tmp_path)  # the real format, but not the published files
    marker = tmp_path / 'code-ran'
    _pickle(tmp_path / 'cifar-10-batches-py' / 'data_batch_1', _Plant(marker))
    _pickle(tmp_path / 'cifar-10-batches-py' / 'batches.meta', _Plant(marker))
    with pytest.raises(ValueError, match=r'refusing to read .*cifar-10-batches-py/data_batch_1: its md5 is'):
        load_openset(name, root=tmp_path)
    assert not marker.exists()


# ---------- DeviceBatches ----------

def _toy(n=10, c=3, h=8, w=8):
    x = torch.randint(1, 256, (n, c, h, w), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    return ImageSet(x, torch.arange(n))


def test_epoch_replay_and_coverage():
    s = _toy(23)
    b = DeviceBatches(s, 5, shuffle=True, augment='crop_flip', mean=(0.5,) * 3, std=(0.25,) * 3, seed=7)
    assert len(b) == 5
    e3 = [(x.clone(), y.clone()) for x, y in b.epoch(3)]
    again = list(DeviceBatches(s, 5, shuffle=True, augment='crop_flip', mean=(0.5,) * 3, std=(0.25,) * 3, seed=7).epoch(3))
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(e3, again))
    assert sorted(torch.cat([y for _, y in e3]).tolist()) == list(range(23))
    assert not torch.equal(torch.cat([y for _, y in e3]), torch.cat([y for _, y in b.epoch(4)]))
    other = torch.cat([y for _, y in DeviceBatches(s, 5, shuffle=True, mean=(0,) * 3, std=(1,) * 3, seed=8).epoch(3)])
    assert not torch.equal(torch.cat([y for _, y in e3]), other)
    dl = DeviceBatches(s, 5, shuffle=False, mean=(0,) * 3, std=(1,) * 3, drop_last=True)
    assert len(dl) == 4 and [len(y) for _, y in dl.epoch(0)] == [5] * 4


def _matches_a_crop(out, img, pad, allow_flip):
    "Does `out` (float in [0,1]) equal some crop of zero-padded `img` (optionally mirrored)?"
    xp = torch.nn.functional.pad(img, (pad,) * 4).float() / 255
    H, W = img.shape[1:]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = xp[:, dy:dy + H, dx:dx + W]
            if torch.equal(crop, out) or (allow_flip and torch.equal(crop.flip(-1), out)):
                return True
    return False


@pytest.mark.parametrize('augment', ['crop', 'crop_flip'])
def test_augmentation_is_a_padded_crop(augment):
    s = _toy(16)
    b = DeviceBatches(s, 16, shuffle=False, augment=augment, mean=(0,) * 3, std=(1,) * 3, seed=1)
    (x, y), = list(b.epoch(0))
    assert x.shape == (16, 3, 8, 8) and x.dtype == torch.float32
    for i in range(16):
        assert _matches_a_crop(x[i], s.x[i], 4, allow_flip=augment == 'crop_flip')
    if augment == 'crop_flip':   # some outputs are mirrored crops only (P(no flip in 16) = 2^-16)
        assert not all(_matches_a_crop(x[i], s.x[i], 4, allow_flip=False) for i in range(16))
    # the offsets vary: not every image is the centre crop
    assert sum(torch.equal(x[i], s.x[i].float() / 255) for i in range(16)) < 16


def test_crop_flip_exact():
    x = torch.arange(2 * 3 * 10, dtype=torch.uint8).view(1, 2, 3, 10).expand(2, 2, 3, 10).contiguous()
    out = crop_flip(x, torch.tensor([4, 4]), torch.tensor([4, 0]), torch.tensor([True, False]))
    assert torch.equal(out[0], x[0].flip(-1))
    assert torch.equal(out[1, :, :, 4:], x[1, :, :, :6]) and out[1, :, :, :4].sum() == 0


def test_normalisation_stats():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(4, 3, 5, 5).contiguous()
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    (xb, _), = list(DeviceBatches(ImageSet(x, torch.zeros(4, dtype=torch.int64)), 4, shuffle=False, mean=mean,
                                  std=std).epoch(0))
    want = [(0 - 0.1) / 0.5, (0.2 - 0.2) / 0.25, (1 - 0.3) / 2.0]
    for c in range(3): assert torch.allclose(xb[:, c], torch.full_like(xb[:, c], want[c]), atol=1e-6)
    ds = load_openset('digits')
    allx = torch.cat([x for x, _ in make_batches(ds.train, ds, 256, train=False).epoch(0)])
    assert abs(allx.mean().item()) < 0.02 and abs(allx.std().item() - 1) < 0.02


def test_make_batches_modes():
    ds = load_openset('digits')
    tb, eb = make_batches(ds.train, ds, 100, train=True, seed=3), make_batches(ds.test_known, ds, 100, train=False)
    assert tb.shuffle and not eb.shuffle and eb.augment == 'none' and tb.augment == ds.augment
    assert torch.equal(torch.cat([y for _, y in eb.epoch(0)]), ds.test_known.y)
    with pytest.raises(ValueError, match='augment'):
        DeviceBatches(ds.train, 8, shuffle=True, augment='flip', mean=ds.mean, std=ds.std)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_same_batches_on_cuda():
    s = _toy(20)
    kw = dict(shuffle=True, augment='crop_flip', mean=(0.5,) * 3, std=(0.25,) * 3, seed=2)
    cpu = list(DeviceBatches(s, 8, **kw).epoch(1))
    gpu = list(DeviceBatches(s, 8, device='cuda', **kw).epoch(1))
    assert gpu[0][0].device.type == 'cuda'
    assert len(gpu) == len(cpu) == 3
    for (a, c), (b, d) in zip(gpu, cpu):   # CUDA's division may differ from the CPU's by an ulp; a wrong pixel by 1/64
        assert torch.equal(c.cpu(), d) and (a.cpu() - b).abs().max() < 1e-5
