"benchmarks/compare_records.py: does a rerun give the committed record's metrics to the last bit?"
import json

import pytest

from conftest import load_benchmark


@pytest.fixture(scope='module')
def tool(): return load_benchmark('compare_records')


def write_record(folder, key, **metrics):
    folder.mkdir(parents=True, exist_ok=True)
    record = dict(key=key, metrics=metrics, hardware=dict(cpu='test cpu'), created='2026-12-07')
    (folder / f'{key}.json').write_text(json.dumps(record))
    return folder / f'{key}.json'


def test_the_same_metrics_are_identical_and_exit_0(tool, tmp_path, capsys):
    write_record(tmp_path / 'store' / 'records', 'k1', dr_auroc=0.6486830555555556, dr_acc=0.67)
    write_record(tmp_path / 'store' / 'records', 'only_in_a', dr_auroc=0.5)
    rerun = write_record(tmp_path / 'rerun', 'k1', dr_auroc=0.6486830555555556, dr_acc=0.67)
    assert tool.main([str(tmp_path / 'store'), str(rerun)]) == 0
    assert capsys.readouterr().out.strip().endswith('identical')


def test_a_difference_in_the_last_bits_is_not_identical(tool, tmp_path):
    write_record(tmp_path / 'a', 'k1', dr_auroc=0.6486830555555556, dr_acc=0.67)
    write_record(tmp_path / 'b', 'k1', dr_auroc=0.6486830555555557, dr_acc=0.67)
    rows = tool.compare(tool.load_records(tmp_path / 'a'), tool.load_records(tmp_path / 'b'))
    assert tool.verdict(rows).startswith('differ: largest') and max(g for *_, g in rows) > 0
    assert tool.main([str(tmp_path / 'a'), str(tmp_path / 'b')]) == 1


def test_a_missing_metric_or_no_shared_key_is_said(tool, tmp_path):
    write_record(tmp_path / 'a', 'k1', dr_auroc=0.6, dr_acc=0.67)
    write_record(tmp_path / 'b', 'k1', dr_auroc=0.6)
    write_record(tmp_path / 'c', 'k2', dr_auroc=0.6)
    load = tool.load_records
    assert tool.verdict(tool.compare(load(tmp_path / 'a'), load(tmp_path / 'b'))) == 'differ: a metric is missing on one side'
    assert tool.verdict(tool.compare(load(tmp_path / 'a'), load(tmp_path / 'c'))) == 'no record in common'
    with pytest.raises(FileNotFoundError, match='no record file'): load(tmp_path / 'nowhere')
