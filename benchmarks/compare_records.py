"""Is a rerun the same run? Every metric of each record that two places share, side by side.

Run a committed record's run again into a scratch store (`pmal-reproduce run --out SCRATCH --set ...`, with the
store's shared phase-1 models linked in or trained again), then compare the two: same key, same metrics to the last
bit means the rerun trained the same weights (the same CPU arithmetic, torch and seed). A difference prints by how
much, per metric. Reads only JSON records, never checkpoints.

Usage: python benchmarks/compare_records.py results/tiny_cpu/records benchmarks/measured/rerun
       (each argument: a store's records/ folder, a store, or one record file)
"""
import argparse
import json
import sys
from pathlib import Path


def load_records(place):
    "{key: record} of a record file, a records/ folder or a store (its records/ folder)."
    place = Path(place)
    if place.is_file(): files = [place]
    elif (place / 'records').is_dir(): files = sorted((place / 'records').glob('*.json'))
    elif place.is_dir(): files = sorted(place.glob('*.json'))
    else: raise FileNotFoundError(f"{place}: no record file, records/ folder or store there")
    records = {}
    for f in files:
        record = json.loads(f.read_text())
        if isinstance(record, dict) and 'key' in record and 'metrics' in record: records[record['key']] = record
    return records


def compare(a, b):
    "Rows (key, metric, value in a, value in b, |a - b|) for every metric of every key both have."
    rows = []
    for key in sorted(a.keys() & b.keys()):
        ma, mb = a[key]['metrics'], b[key]['metrics']
        for metric in sorted(ma.keys() | mb.keys()):
            va, vb = ma.get(metric), mb.get(metric)
            gap = abs(va - vb) if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None
            rows.append((key, metric, va, vb, gap))
    return rows


def verdict(rows):
    "'identical' when every shared metric is equal to the last bit, else the largest difference."
    if not rows: return 'no record in common'
    gaps = [g for *_, g in rows]
    if any(g is None for g in gaps): return 'differ: a metric is missing on one side'
    return 'identical' if max(gaps) == 0 else f'differ: largest |difference| {max(gaps):.3g}'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('a'); parser.add_argument('b')
    args = parser.parse_args(argv)
    a, b = load_records(args.a), load_records(args.b)
    rows = compare(a, b)
    for key in sorted(a.keys() & b.keys()):
        print(f"{key}: {a[key]['hardware'].get('cpu')} {a[key]['created']} | {b[key]['hardware'].get('cpu')} {b[key]['created']}")
    print(f"{'key':36} {'metric':10} {'a':>20} {'b':>20} {'|a-b|':>8}")
    for key, metric, va, vb, gap in rows:
        print(f"{key:36} {metric:10} {va!r:>20} {vb!r:>20} {'' if gap is None else f'{gap:.2g}':>8}")
    print(verdict(rows))
    return 0 if verdict(rows) == 'identical' else 1


if __name__ == '__main__':
    sys.exit(main())
