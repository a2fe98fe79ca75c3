"""The training demo, the sampler demo and their command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from monai_patchqueue.__main__ import main


def test_demo_prints_a_summary_and_writes_a_png(tmp_path, capsys):
    assert main(["samplers", "--output", str(tmp_path), "--patch-size", "16", "--num-samples", "4", "--seed", "3"]) == 0
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
        main(["samplers", "--output", str(tmp_path), "--num-samples", "3", "--seed", "5"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("command, args, message", [
    ("samplers", ["--patch-size", "0"], "positive integer"),
    ("samplers", ["--patch-size", "200"], "exceeds the spatial shape"),
    ("demo", ["--patch-size", "37"], "exceeds the left-right extent of the training hemisphere (36 voxels)"),
    ("demo", ["--workers", "-1"], "non-negative integer"),
    ("demo", ["--iterations", "x"], "positive integer"),
    ("demo", ["--device", "toaster"], "--device should name a torch device"),
])  # fmt: skip
def test_bad_options_give_a_one_line_error(tmp_path, command, args, message):
    result = subprocess.run(
        [sys.executable, "-m", "monai_patchqueue", command, "--output", str(tmp_path), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


FAST = ["--iterations", "6", "--patch-size", "16", "--samples-per-volume", "4"]


@pytest.mark.parametrize("workers", ["0", "1"])
def test_training_demo_trains_segments_and_writes_its_outputs(tmp_path, capsys, workers):
    import nibabel as nib

    from monai_patchqueue import example_brain

    assert main(["demo", "--output", str(tmp_path), *FAST, "--workers", workers]) == 0
    out = capsys.readouterr().out
    for needle in ("Dice per class", "grey matter", "white matter", "patches/s", "waited for data", str(tmp_path)):
        assert needle in out
    prediction = nib.load(tmp_path / "prediction.nii.gz")
    source = nib.load(example_brain()["image"])
    assert prediction.shape == source.shape
    assert np.allclose(prediction.affine, source.affine)
    assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2}
    assert (tmp_path / "segmentation.png").read_bytes()[:4] == b"\x89PNG"


def test_training_demo_is_reproducible_and_beats_chance(tmp_path):
    from monai_patchqueue.training_demo import run_training_demo

    reports = [run_training_demo(tmp_path / str(i), iterations=12, patch_size=16, samples_per_volume=4,
                                 workers=i, seed=1) for i in (0, 1)]  # fmt: skip
    assert reports[0]["dice"] == reports[1]["dice"]  # same seed, any worker count
    other = run_training_demo(tmp_path / "other", iterations=12, patch_size=16, samples_per_volume=4, seed=2)
    assert other["dice"] != reports[0]["dice"]
    # even 12 batches beat guessing by class frequency on the tissue classes
    assert all(d > c for d, c in zip(reports[0]["dice"][1:], reports[0]["chance_dice"][1:]))


def test_training_demo_samples_only_the_left_hemisphere_and_scores_only_the_right(tmp_path, monkeypatch):
    import nibabel as nib

    from monai_patchqueue import example_brain, training_demo

    seen = []

    def one_epoch(queue, network, iterations, device):
        seen.extend((float(patch["image"].affine[0, 3]), tuple(patch["image"].shape)) for patch in queue)
        return 0.0, 1.0, 0.0

    monkeypatch.setattr(training_demo, "_train", one_epoch)
    report = training_demo.run_training_demo(tmp_path, patch_size=16, samples_per_volume=4, workers=0)
    assert len(seen) == 4 * training_demo.AUGMENTED_COPIES
    # world x of a patch's last voxel column (2 mm voxels): the left hemisphere is x < 0 in this RAS brain
    assert all(shape == (1, 16, 16, 16) and x + 15 * 2.0 < 0 for x, shape in seen)
    assert max(x for x, _ in seen) + 15 * 2.0 > -20  # the side is covered up to near the midline
    label = np.asarray(nib.load(example_brain()["label"]).dataobj)
    right = label[37:]  # x > 0 mm
    assert report["chance_dice"] == pytest.approx(list(np.bincount(right.ravel(), minlength=3) / right.size))


def test_console_script_runs_the_same_command_line(tmp_path):
    script = Path(sys.executable).parent / "monai-patchqueue"
    assert script.is_file(), "the package should be installed with its console script (pip install -e .)"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: monai-patchqueue")
    assert "demo" in result.stdout and "samplers" in result.stdout
    result = subprocess.run(
        [str(script), "demo", "--output", str(tmp_path), "--patch-size", "200"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "monai-patchqueue demo: error:" in result.stderr
    assert "exceeds the left-right extent" in result.stderr and "Traceback" not in result.stderr
