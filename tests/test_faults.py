"""Package-level tests that faults lose nothing: a truncated checkpoint is trained again, drivers that share a store
train each run once, Ctrl-C keeps the checkpoint, and a read-only store or a truncated record gives one line."""
import json, os, signal, subprocess, time

import pytest
import torch

from pmal.cli import main
from pmal.run import execute_run, phase1_dir
from pmal.settings import resolve_settings, run_key
from pmal.store import ResultsStore
from pmal.targets import grid, make_request


def _run(out, profile, **kw):
    return execute_run(resolve_settings(profile=profile, out_dir=str(out), device='cpu', **kw))


def _truncate(path, size=1000):
    with open(path, 'r+b') as f: f.truncate(size)


def test_force_recovers_a_truncated_phase1_checkpoint_shared_by_hard_link(tmp_path, tiny, driver, child_env):
    "Both runs in fresh processes, as a user runs them (in one long pytest process the retrained model differed by 1e-2)."
    cmd = driver + ['run', '--out', str(tmp_path), '--set', f'profile={tiny}', '--set', 'device=cpu']
    assert subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=600).returncode == 0
    store = ResultsStore(tmp_path)
    (path,) = (tmp_path / 'records').glob('*.json')
    first = json.loads(path.read_text())
    work = store.work_dir(first['key']) / 'phase1_model0.pt'
    shared = phase1_dir(resolve_settings(profile=tiny, out_dir=str(tmp_path)), store) / 'phase1_model0.pt'
    assert work.stat().st_ino == shared.stat().st_ino
    _truncate(work)  # truncate -s 1000 .../phase1_model0.pt: the shared copy is the same file
    r = subprocess.run(cmd + ['--force'], env=child_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    again = store.load(first['key'])
    assert again['status'] == 'done' and again['metrics'] == pytest.approx(first['metrics'], abs=1e-12)
    assert torch.load(shared, weights_only=True)['epoch'] == 2 and shared.with_name('phase1_model0.pt.damaged').exists()


def test_a_truncated_m1_linked_into_a_softmax_run_is_trained_again(tmp_path, tiny):
    "The other direction: the softmax baseline trained M1 first, PMAL links it, and the file is damaged."
    softmax = _run(tmp_path, tiny, method='softmax')
    store = ResultsStore(tmp_path)
    m1 = store.work_dir(softmax['key']) / 'model.pt'
    _truncate(m1)
    with pytest.warns(UserWarning, match=r'phase1_model0.pt is damaged'):
        pmal_record = _run(tmp_path, tiny, method='pmal')
    assert pmal_record['status'] == 'done' and pmal_record['reused'] is None  # nothing usable to link: trained
    alone = _run(tmp_path / 'alone', tiny, method='pmal')
    assert pmal_record['metrics'] == pytest.approx(alone['metrics'], abs=1e-12)
    assert torch.load(phase1_dir(resolve_settings(profile=tiny, out_dir=str(tmp_path)), store) / 'phase1_model0.pt',
                      weights_only=True)['epoch'] == 2


def test_three_drivers_on_one_store_train_each_run_once(tmp_path, tiny, driver, child_env):
    out = tmp_path / 'store'
    args = driver + ['--figure', '5a', '--dataset', 'digits', '--profile', tiny, '--out', str(out), '--device', 'cpu']
    procs = [subprocess.Popen(args, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=1200)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    records = [json.loads(p.read_text()) for p in (out / 'records').glob('*.json')]
    assert len(records) == 2 and all(r['status'] == 'done' and 0 <= r['metrics']['dr_auroc'] <= 1 for r in records)
    executed = sum(line.split()[1] == 'done' for o in outs for line in o.splitlines() if line.startswith('['))
    assert executed == 2, outs                                   # each run trained by one driver only
    assert sorted(r['reused'] is None for r in records) == [False, True]  # phase 1 trained once, linked by the other run
    assert not list(out.rglob('*.damaged')) and not list(out.rglob('*.tmp'))


def test_a_run_held_by_another_process_is_not_started_twice(tmp_path, tiny):
    from pmal.files import RunLock
    s = resolve_settings(profile=tiny, out_dir=str(tmp_path), device='cpu')
    lock = RunLock(ResultsStore(tmp_path).lock_path(run_key(s)))
    assert lock.acquire()
    try:
        with pytest.raises(RuntimeError, match=rf'is being run by pid {os.getpid()}'):
            execute_run(s)
    finally: lock.release()
    assert ResultsStore(tmp_path).load(run_key(s)) is None and not (tmp_path / 'work').exists()


def test_ctrl_c_prints_one_line_and_keeps_the_checkpoint(tmp_path, driver, child_env):
    out = tmp_path / 'store'
    args = driver + ['run', '--out', str(out), '--set', 'epochs=30', '--set', 'device=cpu']
    proc = subprocess.Popen(args, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob('work/*/phase1_model0.pt')): time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)  # the kernel is shut down (a few seconds) before the driver exits
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == 'pmal-reproduce: interrupted; rerun the same command to resume'
    assert 'Traceback' not in stderr and 'ZMQError' not in stderr and 'KeyboardInterrupt' not in stderr, stderr[-3000:]
    ckpt = list(out.glob('work/*/phase1_model0.pt'))[0]
    assert torch.load(ckpt, weights_only=True)['epoch'] >= 1 and not list((out / 'records').glob('*.json'))


def test_a_read_only_store_gives_one_line(tmp_path, capsys, monkeypatch):
    import errno, pathlib
    store = tmp_path / 'ro'
    real = pathlib.Path.mkdir
    def mkdir(self, *a, **k):
        if str(self).startswith(str(store)): raise OSError(errno.EROFS, 'Read-only file system', str(self))
        return real(self, *a, **k)
    monkeypatch.setattr(pathlib.Path, 'mkdir', mkdir)
    assert main(['run', '--out', str(store), '--set', 'epochs=1']) not in (0, None)
    err = capsys.readouterr().err.strip()
    assert err.startswith('pmal-reproduce: error: ') and 'Read-only file system' in err and len(err.splitlines()) == 1


def test_a_truncated_record_under_report_gives_one_line(tmp_path, capsys):
    store = ResultsStore(tmp_path)
    store.add_requests([make_request('table1', ['digits'], [0])])
    cells = grid(make_request('table1', ['digits'], [0]), tmp_path)
    store.write(dict(key=cells[0].key, status='done', metrics={}))
    (tmp_path / 'records' / f'{cells[0].key}.json').write_text('{"key": "x", "sta')
    assert main(['report', '--out', str(tmp_path)]) not in (0, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f'{cells[0].key}.json is not valid JSON' in err
