"""Sphinx configuration of the documentation site; `docs/build.py` stages the sources into `_proc/` and runs Sphinx."""
import importlib, re, sys
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the API pages document this checkout's pmal, whatever is installed
import pmal  # noqa: E402

cfg = ConfigParser(delimiters=['='])
cfg.read(ROOT / 'settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']

project = cfg['lib_name']
author = cfg['author']
copyright = cfg['copyright']
release = version = pmal.__version__

extensions = ['myst_nb', 'sphinx.ext.autodoc', 'sphinx.ext.viewcode']
exclude_patterns = ['**/.ipynb_checkpoints']
root_doc = 'index'

# MyST-NB: notebooks are rendered from their stored outputs, never executed
nb_execution_mode = 'off'
nb_merge_streams = True
nb_output_stderr = 'show'
myst_enable_extensions = ['dollarmath', 'amsmath', 'html_image', 'colon_fence']
myst_heading_anchors = 3
myst_dmath_double_inline = True

# autodoc: one page per module, its __all__ in source order; the docstrings are Markdown-ish one-liners (see below)
autodoc_default_options = {'members': True, 'member-order': 'bysource'}
autodoc_typehints = 'none'
autodoc_preserve_defaults = True
add_module_names = False

html_theme = 'sphinx_book_theme'
html_title = f'pmal {release}'
html_static_path = ['_static']
html_css_files = ['custom.css']
html_extra_path = [str(ROOT / '_proc' / 'extra')]  # docs/build.py puts the README's <img> figures there
html_theme_options = {'show_toc_level': 2, 'home_page_in_toc': True, 'navigation_with_keys': False}
html_last_updated_fmt = None
html_show_sourcelink = False


_CODE = re.compile(r'(`+)(.+?)\1')
_MATH = re.compile(r'(?<!\\)\$([^$]+?)\$')


def _inline(text):
    "One line of a Markdown docstring as reST: `code` literal, $math$ as math, everything else escaped."
    out, pos = [], 0
    for m in re.finditer(f'{_CODE.pattern}|{_MATH.pattern}', text):
        out.append(_escape(text[pos:m.start()]))
        code, math = m.group(2), m.group(3)
        out.append(f'``{code}``' if code is not None else f':math:`{math}`')
        out.append('\\ ' if m.end() < len(text) and text[m.end()].isalnum() else '')
        pos = m.end()
    out.append(_escape(text[pos:]))
    return ''.join(out)


def _escape(text):
    return re.sub(r'([\\*_|`<>\[\]])', r'\\\1', text)


def markdown_docstring(app, what, name, obj, options, lines):
    "pmal's docstrings are written as Markdown (nbdev); turn each line into safe reST before autodoc parses it."
    lines[:] = [_inline(l) for l in lines]


# MathJax from the sphinx-mathjax-offline package, copied into the site: equations render without a network (the
# extension itself is not loaded, as it does not declare itself safe for parallel reading)
mathjax_path = 'mathjax/tex-chtml.js'


def copy_mathjax(app, exc):
    if exc is None: importlib.import_module('sphinx-mathjax-offline').copy_mathjax_files(app, exc)


def setup(app):
    app.connect('autodoc-process-docstring', markdown_docstring)
    app.connect('build-finished', copy_mathjax)
    return {'parallel_read_safe': True, 'parallel_write_safe': True}
