"""One atomic writer for the package (pmal.files.atomic_write): concurrent writers of one path never collide, and no
other module renames files into place; RunLock excludes other holders and dies with its process."""
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from pmal.files import RunLock


def _checkpoint_writer(path):
    from pmal.train import atomic_save
    return lambda i: atomic_save({'i': torch.tensor(i), 'pad': torch.zeros(20000)}, path)


def _prototypes_writer(path):
    from pmal.mining import Prototypes
    p = Prototypes(torch.zeros(2, 3, dtype=torch.long), torch.rand(5000), torch.ones(5000, dtype=torch.bool),
                   torch.zeros(5000, dtype=torch.long), {'T': 3})
    return lambda i: p.save(path)


def _failures(write, n=120, workers=4):
    "Call write(i) n times from `workers` threads at once (two drivers saving the same stage); count the OSErrors."
    def one(i):
        try: write(i); return 0
        except OSError: return 1
    with ThreadPoolExecutor(workers) as pool: return sum(pool.map(one, range(n)))


@pytest.mark.parametrize('writer,name', [(_checkpoint_writer, 'c.pt'), (_prototypes_writer, 'p.npz')])
def test_concurrent_saves_of_one_path_never_collide(tmp_path, writer, name):
    "Before: every writer used <path>.tmp, and concurrent saves failed with FileNotFoundError."
    path = tmp_path / name
    assert _failures(writer(path)) == 0
    assert [f.name for f in tmp_path.iterdir()] == [name]  # no temporary file left behind


def test_threads_writing_one_record_never_collide(tmp_path):
    "write_json_atomic named its temporary file by process id only: threads of one process shared it."
    from pmal.store import ResultsStore
    store = ResultsStore(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: store.write(dict(key='k', status='done', i=i, pad='x' * 20000)), range(400)))
    assert store.load('k')['status'] == 'done' and [p.name for p in (tmp_path / 'records').iterdir()] == ['k.json']


def test_every_writer_goes_through_atomic_write():
    "No module but pmal.files renames a temporary file into place (checkpoints, records, prototypes, tables, figures)."
    package = Path(__file__).resolve().parents[1] / 'pmal'
    offenders = [f"{p.name}: {line.strip()}" for p in sorted(package.glob('*.py')) if p.name != 'files.py'
                 for line in p.read_text().splitlines() if re.search(r"os\.replace\(|\.tmp['\"]|'\.tmp|\.savefig\(p\b", line)]
    assert offenders == []


def test_a_lock_excludes_other_holders_until_its_process_dies(tmp_path):
    path = tmp_path / 'locks' / 'k.lock'
    holder = subprocess.Popen([sys.executable, '-c', "import sys, time; from pmal.files import RunLock; "
                               f"l = RunLock({str(path)!r}); assert l.acquire(); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        mine = RunLock(path)
        assert not mine.acquire() and mine.owner().startswith(f"pid {holder.pid} on ")
    finally:
        holder.kill(); holder.wait()
    assert mine.acquire()
    assert json.loads(path.read_text())['pid'] != holder.pid
    mine.release()
