"""Screenshots of the built site as a reader sees it (`make screenshots`, after `make docs`; not part of `make test`).

Headless Chromium (Debian's `chromium` package: `apt-get install chromium`), 1280 px wide, a fresh profile per shot,
no network. Default pages: the home page, the notebooks 12_robustness, 12a, 22_pmal, 34_tables and 35_figures (at the top and at
sections further down), the TinyImageNet results page and one API page; or give pages as `PATH[#ANCHOR][@HEIGHT]` relative to the site, e.g.
`nbs/22_pmal.html#pmal-on-digits@3000`. Each page is shown in a 1280 px wide frame of a blank page, which is how a
section (#ANCHOR) is reached: headless Chromium's own screenshot of a URL with a fragment comes out blank.

    python docs/screenshots.py [--site _docs] [--out _screenshots] [PAGE ...]
"""
import argparse, re, shutil, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ['index.html', 'index.html#results', 'index.html#the-notebooks',
         'nbs/12_robustness.html', 'nbs/12_robustness.html#the-scale-of-eq-7', 'nbs/12a_robustness_study.html',
         'nbs/22_pmal.html', 'nbs/22_pmal.html#pmal-on-digits', 'nbs/22_pmal.html#the-batchnorm-of-the-prototype-pass-measured',
         'nbs/34_tables.html#a-committed-store-table-1-on-digits', 'nbs/35_figures.html#drawn-from-a-committed-store',
         'results/tinyimagenet.html', 'api/pmal.robustness.html', 'search.html?q=robustness']
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--hide-scrollbars', '--virtual-time-budget=8000']


def chromium():
    for name in ('chromium', 'chromium-browser', 'google-chrome'):
        if shutil.which(name): return shutil.which(name)
    sys.exit("screenshots: no chromium found (Debian: apt-get install chromium)")


def shoot(browser, site, page, out, width=1280, height=2000):
    "One screenshot of site/page (PATH[#ANCHOR][@HEIGHT]) into out; returns the PNG's path."
    m = re.fullmatch(r'([^#@]+)(#[^@]*)?(?:@(\d+))?', page)
    path, anchor, h = m.group(1), m.group(2) or '', int(m.group(3) or height)
    path, _, query = path.partition('?')  # e.g. search.html?q=robustness
    url = (site / path).resolve().as_uri() + (f'?{query}' if query else '') + anchor
    png = out / (re.sub(r'[^\w]+', '_', '_'.join(filter(None, [path.rsplit(".", 1)[0], query, anchor, str(h)]))).strip('_') + '.png')
    with tempfile.TemporaryDirectory() as tmp:
        frame = Path(tmp) / 'frame.html'
        frame.write_text(f'<!doctype html><html><body style="margin:0"><iframe src="{url}" '
                         f'style="border:0;width:{width}px;height:{h}px"></iframe></body></html>')
        subprocess.run([browser, *FLAGS, f'--user-data-dir={Path(tmp) / "profile"}', f'--screenshot={png}',
                        f'--window-size={width},{h}', frame.as_uri()], check=True, capture_output=True, timeout=120)
    return png


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--site', default=str(ROOT / '_docs'))
    p.add_argument('--out', default=str(ROOT / '_screenshots'))
    p.add_argument('pages', nargs='*', default=PAGES)
    args = p.parse_args(argv)
    site, out = Path(args.site), Path(args.out)
    if not (site / 'index.html').exists(): sys.exit(f"screenshots: no site in {site}: run `make docs` first")
    out.mkdir(parents=True, exist_ok=True)
    browser = chromium()
    for page in args.pages: print(shoot(browser, site, page, out))


if __name__ == '__main__':
    main()
