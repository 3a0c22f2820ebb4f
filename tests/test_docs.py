"""The documentation site's staging (docs/build.py) without running Sphinx: every notebook is in the table of contents,
nbdev directives are dropped, stored errors are caught. `make docs` runs the real build (Sphinx, warnings as errors)."""
import importlib.util, json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('docs_build', ROOT / 'docs' / 'build.py')
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)


def test_every_notebook_is_in_the_table_of_contents_in_reading_order():
    listed = build.toc_entries((ROOT / 'docs' / 'toc.md').read_text())
    notebooks = sorted(p.relative_to(ROOT).with_suffix('').as_posix() for p in (ROOT / 'nbs').rglob('*.ipynb')
                       if '.ipynb_checkpoints' not in p.parts)
    assert sorted(listed) == notebooks
    top = [d for d in listed if d.count('/') == 1]
    assert top == sorted(top)  # nbs/NN_name: the numbers are the reading order


def test_staging_drops_directives_and_hidden_cells_and_reports_errors(tmp_path):
    cell = lambda src, **kw: dict(cell_type='code', metadata={}, source=src, outputs=kw.get('outputs', []), execution_count=None)
    nb = dict(nbformat=4, nbformat_minor=5, metadata={}, cells=[
        cell('#| default_exp robustness'), cell('#| export\ndef f(): pass'), cell('#| hide\nsecret = 1'),
        cell('#| echo: false\nplot()'),
        cell('warn()', outputs=[dict(output_type='stream', name='stderr', text='/x/y/pmal/diversity.py:1: UserWarning: w\n')]),
        cell('1/0', outputs=[dict(output_type='error', ename='ZeroDivisionError', evalue='division by zero', traceback=[])])])
    (tmp_path / 'nbs').mkdir()
    src = tmp_path / 'nbs' / '99_x.ipynb'
    src.write_text(json.dumps(nb))
    build.ROOT, root = tmp_path, build.ROOT
    try: module, errors = build.stage_notebook(src, tmp_path / 'out.ipynb')
    finally: build.ROOT = root
    staged = json.loads((tmp_path / 'out.ipynb').read_text())['cells']
    assert module == 'robustness'
    assert [''.join(c['source']) for c in staged] == ['def f(): pass', 'plot()', 'warn()', '1/0']
    assert staged[1]['metadata']['tags'] == ['remove-input']
    assert staged[2]['outputs'][0]['text'] == 'pmal/diversity.py:1: UserWarning: w\n'
    assert len(errors) == 1 and 'ZeroDivisionError' in errors[0]


def test_results_tables_keep_their_numbers_on_one_line():
    text = "| row | AUROC |\n|---|---|\n| PMAL | 93.2 ± 2.8 |\n\n| notebook | what |\n|---|---|\n| 03 | mean ± std |\n"
    out = build.number_tables(text)
    assert out.count(':::{container} pmal-numbers') == 1 and '| 03 | mean ± std |' in out.split(':::\n', 2)[-1]
