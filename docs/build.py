"""Build the documentation site (`make docs`): Sphinx with MyST-NB, from the notebooks as they are stored.

Stages into `_proc/src/` (git-ignored, rebuilt each time): every notebook of `nbs/` and `nbs/experiments/` with its stored
outputs (nothing is executed; nbdev's `#|` directive lines are dropped, `#| hide` cells too), the README as the home
page followed by `docs/toc.md` (the table of contents, in reading order), the committed tables and figures it links
to, and one API page per module (autodoc, from the docstrings). Then runs Sphinx into `_docs/` (or the folder given),
warnings as errors. It fails on a notebook that is not in `docs/toc.md`, on a stored error output, and on any
Sphinx warning (a broken link, image or page).

    python docs/build.py [OUT]
"""
import json, re, shutil, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS, WORK = ROOT / 'docs', ROOT / '_proc'
STAGE = WORK / 'src'      # the site's sources
EXTRA = WORK / 'extra'    # copied as is into the site's root (html_extra_path): the README's <img> figures
HTML = WORK / 'html'      # Sphinx writes here (MyST-NB puts its image files beside it), then the site moves to OUT
DIRECTIVE = re.compile(r'^\s*#\|\s?(.*)$')
LOCAL_PATH = re.compile(r'(?:/[^\s:/]+)+/(pmal/\w+\.py)')  # /where/it/ran/pmal/x.py in a stored warning -> pmal/x.py


def _directives(lines):
    "nbdev's `#| name args` lines of a cell, as {name: args}; a directive ends at the first other line."
    out = {}
    for line in lines:
        m = DIRECTIVE.match(line)
        if not m: break
        name, _, args = m.group(1).strip().partition(' ')
        out[name.rstrip(':')] = args.strip()
    return out


def stage_notebook(src, dst):
    "Copy a notebook for the site: drop directive lines and hidden cells; return (its module, its error outputs)."
    nb = json.loads(src.read_text(encoding='utf-8'))
    cells, module, errors = [], None, []
    for cell in nb['cells']:
        lines = ''.join(cell['source']).split('\n')
        if cell['cell_type'] == 'code':
            d = _directives(lines)
            module = module or d.get('default_exp')
            if 'hide' in d or d.get('include') == 'false': continue
            lines = [l for l in lines if not DIRECTIVE.match(l)]
            tags = cell.setdefault('metadata', {}).setdefault('tags', [])
            if d.get('echo') == 'false': tags.append('remove-input')
            if d.get('output') == 'false': tags.append('remove-output')
            if not ''.join(lines).strip() and not cell.get('outputs'): continue
            errors += [f"{src.relative_to(ROOT)}: cell {len(cells)} stored an error output: {o.get('ename')}: {o.get('evalue')}"
                       for o in cell.get('outputs', []) if o.get('output_type') == 'error']
            for o in cell.get('outputs', []):
                if o.get('output_type') == 'stream': o['text'] = LOCAL_PATH.sub(r'\1', ''.join(o['text']))
        source = '\n'.join(lines).strip('\n')
        cell['source'] = source.splitlines(keepends=True)
        cells.append(cell)
    nb['cells'] = cells
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(nb, indent=1, ensure_ascii=False), encoding='utf-8')
    return module, errors


def toc_entries(text):
    "Documents listed in the toctree fences of a MyST text."
    entries = []
    for block in re.findall(r'```\{toctree\}\n(.*?)```', text, flags=re.S):
        entries += [l.strip() for l in block.splitlines() if l.strip() and not l.strip().startswith(':')]
    return entries


def number_tables(text):
    "Markdown tables of results (cells like 93.1 ± 2.2) inside a `pmal-numbers` container, whose cells do not wrap (custom.css)."
    def wrap(m):
        return f":::{{container}} pmal-numbers\n{m.group(0)}:::\n" if re.search(r'\d ± \d', m.group(0)) else m.group(0)
    return re.sub(r'(?:^\|.*\n)+', wrap, text, flags=re.M)


def home_page(readme, toc, api):
    "The README with links on the notebook table's names, then the table of contents and the API reference."
    def link(m):
        name = m.group(1)
        return f"| [`{name}`](nbs/{name}.ipynb) |" if (ROOT / 'nbs' / f'{name}.ipynb').exists() else m.group(0)
    text = re.sub(r'^\| `(\d\d_\w+)` \|', link, readme, flags=re.M)
    text = re.sub(r'\| `(pmal\.\w+)` \|', lambda m: f"| [`{m.group(1)}`](api/{m.group(1)}.md) |"
                  if (ROOT / 'pmal' / f"{m.group(1).split('.')[1]}.py").exists() else m.group(0), text)
    api_toc = '```{toctree}\n:caption: API reference\n:maxdepth: 1\n\n' + '\n'.join(f'api/{m}' for m in api) + '\n```\n'
    return number_tables(text).rstrip('\n') + '\n\n' + toc + '\n' + api_toc


def api_page(module, notebook):
    return (f"# {module}\n\nThe API of `{module}`, from its docstrings; its source, with the equations, worked examples and "
            f"lessons, is the notebook [{notebook.stem}](../{notebook.relative_to(ROOT).as_posix()}).\n\n"
            f"```{{eval-rst}}\n.. automodule:: {module}\n```\n")


def orphan(text):
    "A page reached by a link, not from the table of contents; its headings shifted so that the first is a title (H1)."
    levels = [len(h) for h in re.findall(r'^(#+) ', text, flags=re.M)]
    if levels and min(levels) > 1: text = re.sub(r'^#{%d}' % (min(levels) - 1), '', text, flags=re.M)
    return '---\norphan: true\n---\n\n' + number_tables(text)


def stage():
    "Fill _proc/ with the site's sources; returns the problems found (an empty list when all is well)."
    shutil.rmtree(WORK, ignore_errors=True)
    STAGE.mkdir(parents=True)
    problems, modules = [], {}
    notebooks = sorted(p for p in (ROOT / 'nbs').rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)
    for nb in notebooks:
        module, errors = stage_notebook(nb, STAGE / nb.relative_to(ROOT))
        problems += errors
        if module: modules[f'pmal.{module}'] = nb
    toc = (DOCS / 'toc.md').read_text(encoding='utf-8')
    listed = toc_entries(toc)
    for nb in notebooks:
        doc = nb.relative_to(ROOT).with_suffix('').as_posix()
        if doc not in listed: problems.append(f"{nb.relative_to(ROOT)} is not in the table of contents: add '{doc}' to docs/toc.md")
    for doc in listed:
        if not (ROOT / f'{doc}.ipynb').exists(): problems.append(f"docs/toc.md lists {doc}, which is not a notebook of nbs/")
    if problems: return problems
    # API pages, in reading order; every module of the package must come from a notebook
    order = [d for d in listed if (ROOT / f'{d}.ipynb') in modules.values()]
    api = sorted(modules, key=lambda m: order.index(modules[m].relative_to(ROOT).with_suffix('').as_posix()))
    for py in sorted((ROOT / 'pmal').glob('*.py')):
        if not py.stem.startswith('_') and f'pmal.{py.stem}' not in modules:
            problems.append(f"pmal/{py.name} has no notebook with '#| default_exp {py.stem}'")
    (STAGE / 'api').mkdir()
    for m in api: (STAGE / 'api' / f'{m}.md').write_text(api_page(m, modules[m]), encoding='utf-8')
    # the home page, and what it links to: the committed tables (pages), figures and benchmark notes
    (STAGE / 'index.md').write_text(home_page((ROOT / 'README.md').read_text(encoding='utf-8'), toc, api), encoding='utf-8')
    for md in [*(ROOT / 'figures').glob('*.md'), ROOT / 'benchmarks' / 'results.md', *(ROOT / 'results').glob('*.md'),
               *(ROOT / 'results').glob('*/tables/*.md')]:
        if md.exists():
            page = STAGE / md.parent.relative_to(ROOT) / md.name
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(orphan(md.read_text(encoding='utf-8')), encoding='utf-8')
    shutil.copytree(ROOT / 'figures', STAGE / 'figures', dirs_exist_ok=True, ignore=shutil.ignore_patterns('*.md'))
    shutil.copytree(ROOT / 'figures', EXTRA / 'figures', ignore=shutil.ignore_patterns('*.md'))
    return problems


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out = (Path(argv[0]) if argv else ROOT / '_docs').absolute()
    if out.exists() and any(out.iterdir()) and not (out / '.buildinfo').exists():
        print(f"docs: {out} is not empty and not a site built before: not replacing it", file=sys.stderr)
        return 2
    t = time.time()
    problems = stage()
    if problems:
        print('docs: ' + '\n      '.join(problems), file=sys.stderr)
        return 1
    from sphinx.cmd.build import build_main
    rc = build_main(['-b', 'html', '-q', '-W', '--keep-going', '-j', 'auto', '-d', str(WORK / 'doctrees'),
                     '-c', str(DOCS), str(STAGE), str(HTML)])
    if rc != 0:
        print(f"docs: the build failed (warnings above; a warning fails the build); what was built is in {HTML}", file=sys.stderr)
        return rc
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(HTML, out)
    print(f"docs: built {out / 'index.html'} in {time.time() - t:.0f}s")
    return 0


if __name__ == '__main__':
    sys.exit(main())
