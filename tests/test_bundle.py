"""The MONAI bundle in tutorials/bundle: training and inference run end to end with `python -m monai.bundle run`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

BUNDLE = Path(__file__).resolve().parents[1] / "tutorials" / "bundle"
CONFIGS = BUNDLE / "configs"
# one epoch of 2 copies x 4 patches = 2 batches of 4, validated once
FAST_TRAINING = {"max_epochs": "1", "val_interval": "1", "samples_per_volume": "4", "augmented_copies": "2"}


def _run_bundle(config: str, **overrides: str) -> str:
    # -X faulthandler: a crash (e.g. an abort at exit) prints every thread's Python stack into the failure message
    command = [sys.executable, "-X", "faulthandler", "-m", "monai.bundle", "run",
               "--config_file", str(CONFIGS / config),
               "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"),
               "--bundle_root", str(BUNDLE)]  # fmt: skip
    for key, value in overrides.items():
        command += [f"--{key}", value]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=BUNDLE)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("models")
    log = _run_bundle("train.json", output_dir=str(models), **FAST_TRAINING)
    assert "Epoch: 1/1, Iter: 2/2" in log  # the queue served exactly 8 patches in batches of 4
    assert "val_mean_dice" in log  # GridInferer ran in the SupervisedEvaluator
    return models


def test_training_saves_the_best_and_the_final_model(trained):
    for name in ("model.pt", "model_final.pt"):
        state = torch.load(trained / name, map_location="cpu", weights_only=True)
        assert any(key.endswith("weight") for key in state), name


def test_inference_segments_the_brain_as_grid_inferer_does_with_the_trained_weights(trained, tmp_path, brain):
    from monai.bundle import ConfigParser
    from monai.transforms import ScaleIntensity

    from monai_patchqueue import GridInferer

    _run_bundle("inference.json", ckpt_path=str(trained / "model.pt"), output_dir=str(tmp_path))
    saved = nib.load(tmp_path / "mni152_2mm_t1_seg.nii.gz")
    segmentation = np.asarray(saved.dataobj)
    assert segmentation.dtype == np.uint8 and segmentation.shape == tuple(brain["image"].shape[1:])
    np.testing.assert_allclose(saved.affine, brain["image"].affine.numpy(), atol=1e-5)
    assert set(np.unique(segmentation)) <= {0, 1, 2}

    parser = ConfigParser()
    parser.read_config(CONFIGS / "inference.json")
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(trained / "model.pt", map_location="cpu", weights_only=True))
    network.eval()
    inferer = GridInferer(32, patch_overlap=8, overlap_mode="hann", batch_size=4)
    with torch.no_grad():
        expected = inferer(ScaleIntensity()(brain["image"])[None], network).argmax(1)[0].numpy()
    assert (segmentation == expected).mean() > 0.999  # argmax ties aside, the same segmentation


def test_training_and_inference_configs_agree_on_the_network_and_the_patches():
    train, inference = (json.loads((CONFIGS / name).read_text()) for name in ("train.json", "inference.json"))
    assert train["network_def"] == inference["network_def"]
    for key in ("patch_size", "patch_overlap", "batch_size"):
        assert train[key] == inference[key], key
    grid_inferer = "monai_patchqueue.GridInferer"
    assert train["validate"]["inferer"]["_target_"] == inference["inferer"]["_target_"] == grid_inferer


def test_metadata_describes_the_network_input_and_output():
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id="network_def", meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "train.json")
    )
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    train = json.loads((CONFIGS / "train.json").read_text())
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == [train["patch_size"]] * 3
    assert metadata["network_data_format"]["outputs"]["pred"]["num_channels"] == train["network_def"]["out_channels"]
