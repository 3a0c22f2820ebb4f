"The committed result records rebuild the committed tables exactly (no data, no training): README numbers come from them."
import json
import re
import shutil
from pathlib import Path

import pytest

from pmal.pipeline import PMALConfig
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



def _hand_table(heading):
    "The lines of the results page's hand-laid table under the paragraph that opens with `heading` (its first table after it)."
    page = (RESULTS / 'tinyimagenet.md').read_text().splitlines()
    start = next(i for i, line in enumerate(page) if line.startswith(heading))
    first = next(i for i in range(start, len(page)) if page[i].startswith('|'))
    end = next((i for i in range(first, len(page)) if not page[i].startswith('|')), len(page))
    return page[first:end]


def _page_and_rows(table_name, *starts, store='tiny_cpu_fp32'):
    "The results page's lines and the cells of the committed table's rows (a store's) that start with one of `starts`."
    table = (RESULTS / store / 'tables' / table_name).read_text()
    rows = [[c.strip() for c in line.split('|')] for line in table.splitlines() if line.startswith(starts)]
    return (RESULTS / 'tinyimagenet.md').read_text().splitlines(), rows


@pytest.mark.parametrize('store, heading', [('tiny_cpu_fp32', '**Table 4 in float32**'), ('tiny_cpu', '**Table 4 in bf16**')])
def test_results_page_table4_rows_match_the_committed_table(store, heading):
    "The results page's hand-laid Table 4 (with each run's time) carries the committed table's ACC, AUROC and paper numbers, row by row."
    _, rows = _page_and_rows(f'table4_tinyimagenet_{store}.md', '| quality:', '| diversity:', '| ours', store=store)
    hand = _hand_table(heading)
    done = [cells for cells in rows if cells[5] != 'missing']
    assert len(rows) == 6 and len(hand) == 2 + len(done)  # header, rule, one line per finished row
    for cells in done:
        row, acc, acc_paper, auroc, auroc_paper = cells[1], cells[5], cells[6], cells[8], cells[9]
        mine = [line for line in hand if line.startswith(f'| {row}')]
        assert any(f"| {acc} | {auroc} | {acc_paper} / {auroc_paper} |" in line for line in mine), (row, acc, auroc)


def test_results_page_float32_table3_rows_match_the_committed_table():
    "The results page's hand-laid Table 3 (float32, the rows run so far) carries the committed table's ACC, AUROC and paper AUROC."
    page, rows = _page_and_rows('table3_tinyimagenet_tiny_cpu_fp32.md', '| (')
    done = [cells for cells in rows if cells[5] != 'missing']
    assert len(rows) == 6 and len(done) >= 3
    for cells in done:
        label, acc, auroc, auroc_paper = cells[1].split()[0], cells[5], cells[8], cells[9]
        mine = [line for line in page if line.startswith(f'| {label} ')]
        assert any(f"| {acc} | {auroc} | {auroc_paper} |" in line for line in mine), (label, acc, auroc)


PRETTY = {'T': 'T', 'eps': 'ε', 'U': 'U', 'delta': 'δ', 'lambda_p': 'λ_p'}
DEFAULTS = {f'{k}={getattr(PMALConfig(), k)}' for k in PRETTY}  # the paper's defaults, as Table 5 labels its rows


def _table5_done_rows(store='tiny_cpu_fp32'):
    "The finished rows of a store's committed Table 5 as (page label, ACC, AUROC, paper AUROC); the defaults once, as T = 10."
    _, rows = _page_and_rows(f'table5_tinyimagenet_{store}.md', *(f'| {k}=' for k in PRETTY), store=store)
    done = [c for c in rows if c[5] != 'missing' and (c[1] == 'T=10' or c[1] not in DEFAULTS)]
    return [(' = '.join([PRETTY[c[1].split('=')[0]], c[1].split('=')[1]]), c[5], c[8], c[9]) for c in done]


@pytest.mark.parametrize('store, heading', [('tiny_cpu_fp32', '**Table 5 in float32**'), ('tiny_cpu', '**Table 5 in bf16**')])
def test_results_page_table5_rows_match_the_committed_table(store, heading):
    "The results page's hand-laid Table 5 (the rows run so far, with each run's time) carries every finished row of the committed table."
    hand = _hand_table(heading)
    done = _table5_done_rows(store)
    assert len(done) >= 3 and len(hand) == 2 + len(done)
    for label, acc, auroc, auroc_paper in done:
        mine = [line for line in hand if line.startswith((f'| {label} |', f'| {label} ('))]
        assert any(f"| {acc} | {auroc} | {auroc_paper} |" in line for line in mine), (label, acc, auroc)


@pytest.mark.parametrize('store, opening', [('tiny_cpu_fp32', 'Float32 Table 5 so far'), ('tiny_cpu', 'bf16 Table 5 so far')])
def test_readme_table5_list_matches_the_committed_table(store, opening):
    "The README's list of a store's Table 5 rows (DR AUROC / ACC [paper AUROC]) carries every finished row of the table."
    readme = ' '.join((RESULTS.parent / 'README.md').read_text().split())
    start = readme.index(opening)
    listed = readme[start:readme.index(f'([`results/{store}/tables/table5', start)]
    done = _table5_done_rows(store)
    for label, acc, auroc, auroc_paper in done:
        assert re.search(rf'{re.escape(label)}( \(the defaults\))? {auroc} / {acc} \[{auroc_paper}\]', listed), (label, listed)
    assert len(re.findall(r'\[\d', listed)) == len(done), listed


def _component_effects(store, table_name):
    "The one-component differences of a committed Table 3's note: {'(c) − (a)': ('+3.2 / +3.9', '+1.3'), ...}, with − signs."
    note = next(l for l in (RESULTS / store / 'tables' / table_name).read_text().splitlines() if 'one component at a time' in l)
    found = re.findall(r'(\([a-f]\) − \([a-f]\)) ([-+]\d+\.\d / [-+]\d+\.\d) \[paper ([-+]\d+\.\d)\]', note)
    return {pair: (ours.replace('-', '−'), paper.replace('-', '−')) for pair, ours, paper in found}


def test_results_page_component_effects_match_the_committed_table3_notes():
    "The results page's table of Table 3's component effects carries the float32 and the bf16 tables' own notes."
    page = (RESULTS / 'tinyimagenet.md').read_text().splitlines()
    fp32 = _component_effects('tiny_cpu_fp32', 'table3_tinyimagenet_tiny_cpu_fp32.md')
    bf16 = _component_effects('tiny_cpu', 'table3_tinyimagenet_tiny_cpu.md')
    assert len(fp32) == 7 and set(bf16) <= set(fp32)
    for pair, (ours, paper) in fp32.items():
        cells = [c.strip() for c in next(l for l in page if f'| {pair} |' in l).split('|')][2:-1]
        assert cells == [pair, ours, paper, bf16[pair][0] if pair in bf16 else ''], cells


def test_a_table_from_two_machines_names_the_runs_off_the_common_one(tmp_path):
    "Table 3 (split 0) mixes an AMD EPYC and a Xeon run: its note says which ran where, as the committed table does."
    from pmal.tables import write_table
    from pmal.targets import make_request
    store = tmp_path / 'tiny_cpu'
    shutil.copytree(RESULTS / 'tiny_cpu' / 'records', store / 'records')
    md, _ = write_table(ResultsStore(store), make_request('table3', ['tinyimagenet'], [0], profile='tiny_cpu'))
    note = next(line for line in md.splitlines() if line.startswith('* Machines'))
    assert 'on AMD EPYC; the others on Intel(R) Xeon(R) Processor: (d) diversity + point-to-set, split 0.' in note
    assert '| (a) quality | DR: min nearest-prototype distance |' in md  # row (a) rejects by its own, nearest, distance


@pytest.mark.parametrize('manifest', sorted(RESULTS.glob('*/tables.json')) + sorted(RESULTS.glob('*/figures.json')),
                         ids=lambda p: f'{p.parent.name}/{p.name}')
def test_committed_manifests_list_the_store_files_relative_to_the_store(manifest):
    "tables.json / figures.json name files that a fresh clone has: relative to the store root, never one machine's path."
    paths = json.loads(manifest.read_text())
    assert paths
    for p in paths:
        assert not Path(p).is_absolute(), p
        committed = Path(p).suffix != '.pdf'  # .gitignore keeps a store's PDFs out: its PNG and caption carry the figure
        assert (manifest.parent / p).is_file() or not committed, p
