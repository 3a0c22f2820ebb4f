"The committed result records rebuild the committed tables exactly (no data, no training): README numbers come from them."
import shutil
from pathlib import Path

import pytest

from pmal.store import ResultsStore
from pmal.tables import make_tables

RESULTS = Path(__file__).resolve().parents[1] / 'results'
STORES = sorted(p for p in RESULTS.glob('*') if (p / 'records').is_dir())


@pytest.mark.parametrize('store', STORES, ids=lambda p: p.name)
def test_committed_tables_rebuild_from_committed_records(store, tmp_path):
    copy = tmp_path / store.name
    shutil.copytree(store / 'records', copy / 'records')
    shutil.copy(store / 'requests.json', copy / 'requests.json')
    texts, paths = make_tables(ResultsStore(copy))
    assert paths
    for p in map(Path, paths):
        if p.suffix == '.md':
            assert p.read_text() == (store / 'tables' / p.name).read_text(), p.name


def test_readme_tinyimagenet_rows_match_the_committed_table():
    table = (RESULTS / 'tiny_cpu' / 'tables' / 'table1_tinyimagenet_tiny_cpu.md').read_text()
    readme = (RESULTS.parent / 'README.md').read_text()
    for line in table.splitlines():
        if line.startswith('| PMAL (DR)') or line.startswith('| Softmax (MSP)'):
            cells = [c.strip() for c in line.split('|')]
            acc, auroc = cells[5], cells[8]
            assert f"| {acc} | {auroc} |" in readme, (acc, auroc)
