"""Every Python example of docs/embedding.md runs as it stands (each in a fresh interpreter)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the examples of docs/embedding.md need PyTorch")

DOC = Path(__file__).resolve().parents[2] / "docs" / "embedding.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_the_page_has_its_four_examples():
    assert len(EXAMPLES) == 4


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_example_runs(index):
    done = subprocess.run(
        [sys.executable, "-c", EXAMPLES[index]], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "each example prints what it made"
