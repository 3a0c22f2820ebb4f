"The README's Python example runs as written (on the digits stand-in it builds)."
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / 'README.md'


def python_blocks(text):
    "The ```python fenced blocks of a Markdown text."
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_example_runs(tmp_path):
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no ```python example"
    script = tmp_path / 'readme_example.py'
    script.write_text('import torch; torch.set_num_threads(1)\n' + '\n'.join(blocks)
                      + "\nassert 0.5 <= pmal.evaluate(split)['dr_auroc'] <= 1 and set(labels.tolist()) <= set(range(-1, 6))\n")
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / 'my_pmal.pt').exists() and (tmp_path / 'runs' / 'my_data' / 'phase2.pt').exists()
