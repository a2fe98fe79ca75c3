"""The README's quickstart runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python block"
    namespace: dict = {}
    exec(compile(blocks[0], "README quickstart", "exec"), namespace)
    out = capsys.readouterr().out
    assert "torch.Size([16, 1, 32, 32, 32])" in out and "torch.Size([16, 6])" in out
    assert tuple(namespace["patch"]["image"].shape) == (1, 73, 91, 78)


def test_queue_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "the README has no patch queue example"
    namespace: dict = {}
    exec(compile(blocks[1], "README queue example", "exec"), namespace)
    queue = namespace["queue"]
    assert len(queue) == 6 * 8 and queue.statistics.patches == 48 and queue.worker_pids == []
    assert tuple(namespace["batch"]["image"].shape) == (4, 1, 32, 32, 32)


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert "bash scripts/run.sh demo" in first_block and "bash scripts/run.sh test" in first_block
    assert "bash scripts/run.sh test" in (README.parent / ".ci" / "run").read_text().replace("exec ", "")
