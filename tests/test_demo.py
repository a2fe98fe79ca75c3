"""The sampler demo and its command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from monai_patchqueue.__main__ import main


def test_demo_prints_a_summary_and_writes_a_png(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path), "--patch-size", "16", "--num-samples", "4", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    for name in ("UniformSamplerd", "WeightedSamplerd", "LabelSamplerd", "GridSamplerd"):
        assert name in out
    assert "location [" in out and "centre class share" in out
    png = tmp_path / "patches.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert str(png.resolve()) in out


def test_demo_is_deterministic_for_a_seed(tmp_path, capsys):
    outputs = []
    for _ in range(2):
        main(["demo", "--output", str(tmp_path), "--num-samples", "3", "--seed", "5"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("args, message", [(["--patch-size", "0"], "positive integer"),
                                           (["--patch-size", "200"], "exceeds the spatial shape")])  # fmt: skip
def test_bad_options_give_a_one_line_error(tmp_path, args, message):
    result = subprocess.run(
        [sys.executable, "-m", "monai_patchqueue", "demo", "--output", str(tmp_path), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
