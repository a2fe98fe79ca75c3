"""GridInferer: exactness, metadata, network outputs, modes, MONAI engines and bundle configs."""

from __future__ import annotations

import json

import pytest
import torch
from monai.data import MetaTensor, decollate_batch
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, SpatialPadd

from monai_patchqueue import GridInferer

MODES = ["crop", "average", "hann", "gaussian"]


def _conv_net(channels_out: int = 2, ndim: int = 3) -> torch.nn.Module:
    conv = torch.nn.Conv3d if ndim == 3 else torch.nn.Conv2d
    torch.manual_seed(0)
    return torch.nn.Sequential(conv(1, 4, 3, padding=1), torch.nn.ReLU(), conv(4, channels_out, 3, padding=1))


@pytest.mark.parametrize("ndim", [2, 3])
def test_crop_mode_reproduces_whole_volume_inference(ndim):
    # Two 3x3 convolutions: receptive-field radius 2 <= overlap / 2.
    network = _conv_net(ndim=ndim).eval()
    shape = (23, 19, 17)[:ndim]
    image = torch.rand(2, 1, *shape)
    with torch.no_grad():
        whole = network(image)
        patched = GridInferer(10, patch_overlap=4, batch_size=3)(image, network)
    torch.testing.assert_close(patched, whole, rtol=1e-5, atol=1e-6)


def test_crop_mode_with_too_little_overlap_is_not_exact():
    network = _conv_net().eval()
    image = torch.rand(1, 1, 23, 19, 17)
    with torch.no_grad():
        patched = GridInferer(10, patch_overlap=2)(image, network)
        assert not torch.allclose(patched, network(image), atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_mode", [None, "edge"])
def test_identity_network_returns_the_input(mode, padding_mode):
    image = torch.rand(2, 3, 14, 11, 9)
    output = GridInferer((6, 5, 4), patch_overlap=2, overlap_mode=mode, padding_mode=padding_mode)(image, lambda x: x)
    torch.testing.assert_close(output, image, rtol=1e-5, atol=1e-6)


def _meta_image() -> MetaTensor:
    affine = torch.diag(torch.tensor([2.0, 1.5, 3.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([10.0, -4.0, 7.0])
    return MetaTensor(torch.rand(1, 1, 16, 12, 10), affine=affine)


def test_output_carries_the_input_meta_and_decollates():
    image = _meta_image()
    image.meta["filename_or_obj"] = "brain.nii.gz"
    output = GridInferer(8, patch_overlap=2, overlap_mode="hann")(image, lambda x: torch.cat([x, -x], dim=1))
    assert isinstance(output, MetaTensor) and tuple(output.shape) == (1, 2, 16, 12, 10)
    torch.testing.assert_close(output.affine, image.affine)
    item = decollate_batch(output)[0]
    assert item.meta["filename_or_obj"] == "brain.nii.gz" and tuple(item.shape) == (2, 16, 12, 10)


def test_invertd_and_saveimaged_work_on_the_output(tmp_path):
    from monai.transforms import SaveImaged

    preprocess = Compose([EnsureChannelFirstd("image", channel_dim="no_channel"), SpatialPadd("image", (20, 16, 12))])
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    raw = MetaTensor(torch.rand(16, 12, 10), affine=affine, meta={"filename_or_obj": "case.nii.gz"})
    data = preprocess({"image": raw})
    batch_image = data["image"][None]
    batch_image.is_batch = True
    prediction = GridInferer(8, patch_overlap=2)(batch_image, lambda x: 3 * x)
    item = {"image": data["image"], "pred": decollate_batch(prediction)[0]}
    restored = Invertd("pred", transform=preprocess, orig_keys="image")(item)["pred"]
    assert tuple(restored.shape) == (1, 16, 12, 10)
    torch.testing.assert_close(restored[0].as_tensor(), 3 * raw.as_tensor())
    SaveImaged("pred", output_dir=str(tmp_path), output_postfix="seg", separate_folder=False)({"pred": restored})
    import nibabel as nib

    saved = nib.load(str(tmp_path / "case_seg.nii.gz"))
    assert saved.shape == (16, 12, 10)
    torch.testing.assert_close(torch.as_tensor(saved.affine), affine)


def test_args_and_kwargs_reach_the_network_and_structured_outputs_are_aggregated():
    image = torch.rand(1, 1, 12, 12, 12)

    def network(x, scale, *, shift):
        return {"scaled": x * scale, "both": (x + shift, x - shift)[0]}, (x * scale, x + shift)

    inferer = GridInferer(6, patch_overlap=2, overlap_mode="average")

    def tuple_network(x, scale, *, shift):
        return x * scale, x + shift

    first, second = inferer(image, tuple_network, 2.0, shift=1.0)
    torch.testing.assert_close(first, 2 * image)
    torch.testing.assert_close(second, image + 1)
    outputs = inferer(image, lambda x, scale, shift: {"a": x * scale, "b": x + shift}, 3.0, shift=-1.0)
    assert set(outputs) == {"a", "b"}
    torch.testing.assert_close(outputs["a"], 3 * image)
    torch.testing.assert_close(outputs["b"], image - 1)
    with pytest.raises(TypeError, match="tuple or dict of tensors"):
        inferer(image, lambda x: "nope")


@pytest.mark.parametrize("mode", MODES)
def test_lower_resolution_outputs_and_their_affine(mode):
    image = _meta_image()
    pool = torch.nn.AvgPool3d(2)
    output = GridInferer(8, patch_overlap=4, overlap_mode=mode)(image, pool)
    assert tuple(output.shape) == (1, 1, 8, 6, 5)
    torch.testing.assert_close(output.as_tensor(), pool(image.as_tensor()), rtol=1e-5, atol=1e-5)
    # Output voxel 0 is the centre of input voxels 0 and 1 along each axis, with twice the spacing.
    expected = image.affine.clone()
    expected[:3, :3] *= 2
    expected[:3, 3] = image.affine[:3, :3] @ torch.full((3,), 0.5, dtype=torch.float64) + image.affine[:3, 3]
    torch.testing.assert_close(output.affine, expected)


def test_network_mode_and_grad_state_are_left_alone():
    network = _conv_net().train()
    image = torch.rand(1, 1, 12, 12, 12)
    output = GridInferer(8, patch_overlap=4)(image, network)
    assert network.training and output.requires_grad  # no eval(), no no_grad()
    with torch.no_grad():
        output = GridInferer(8, patch_overlap=4)(image, network.eval())
    assert not network.training and not output.requires_grad and torch.is_grad_enabled()


def test_progress_bar(capsys):
    GridInferer(4, progress=True)(torch.rand(1, 1, 8, 8, 8), lambda x: x)
    assert "GridInferer" in capsys.readouterr().err


@pytest.mark.parametrize("overlap_mode", ["crop", "average", "hann", "gaussian"])
def test_patches_run_on_sw_device_and_the_output_accumulates_on_device(overlap_mode):
    """torch's "meta" device stands in for a GPU on CPU-only CI: every tensor records where it lives."""
    seen = []

    def network(patches):
        seen.append(patches.device.type)
        return torch.zeros(patches.shape)  # outputs come back on the CPU

    image = torch.rand(1, 1, 8, 8, 8)
    output = GridInferer(4, patch_overlap=2, overlap_mode=overlap_mode, sw_device="meta")(image, network)
    assert set(seen) == {"meta"} and output.device.type == "cpu"  # the output stays on the input's device
    seen.clear()
    output = GridInferer(4, patch_overlap=2, overlap_mode=overlap_mode, device="meta")(image, network)
    assert set(seen) == {"cpu"}  # the patches stay on the input's device
    assert output.device.type == "meta" and tuple(output.shape) == (1, 1, 8, 8, 8)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: GridInferer(8, patch_overlap=3), ValueError, "even"),
        (lambda: GridInferer(8, patch_overlap=8), ValueError, "smaller"),
        (lambda: GridInferer(8, overlap_mode="median"), ValueError, "overlap_mode"),
        (lambda: GridInferer(8, batch_size=0), ValueError, "batch_size=0"),
    ],
)
def test_bad_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_bad_inputs_and_outputs_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(24, 24, 24\) exceeds the spatial shape \(16, 12, 10\) of the input"):
        GridInferer(24)(torch.rand(1, 1, 16, 12, 10), lambda x: x)
    with pytest.raises(ValueError, match=r"exceeds .* after padding"):
        GridInferer(18, patch_overlap=2, padding_mode="edge")(torch.rand(1, 1, 16, 12, 10), lambda x: x)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\[, D\]\).*\(16, 12\)"):
        GridInferer(4)(torch.rand(16, 12), lambda x: x)
    with pytest.raises(ValueError, match=r"output patch \(5, 8, 8\)"):
        GridInferer(8)(torch.rand(1, 1, 16, 16, 16), lambda x: x[:, :, :5])


def test_runs_inside_supervised_evaluator():
    from monai.engines import SupervisedEvaluator
    from monai.handlers import MeanDice, from_engine

    images = torch.rand(4, 1, 16, 16, 12)
    labels = (images > 0.5).float()
    data = [{"image": image, "label": label} for image, label in zip(images, labels)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)

    def network(x):  # a perfect "segmenter": two-channel one-hot of the threshold
        return torch.cat([(x <= 0.5).float(), (x > 0.5).float()], dim=1)

    def onehot_label(batch):
        label = torch.stack([item["label"] for item in batch]) if isinstance(batch, list) else batch["label"]
        return torch.cat([1 - label, label], dim=1)

    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=torch.nn.Identity(),
        inferer=GridInferer(8, patch_overlap=2, overlap_mode="crop"),
        key_val_metric={"dice": MeanDice(output_transform=from_engine(["pred", "label"]))},
        prepare_batch=lambda batch, device, non_blocking, **kw: (batch["image"], onehot_label(batch)),
        postprocessing=None,
    )
    evaluator.network = network
    evaluator.run()
    assert evaluator.state.metrics["dice"] == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")  # MONAI's notice that configs run code
def test_built_and_run_from_a_bundle_config(tmp_path):
    from monai.bundle import run

    config = {
        "image": "$torch.rand(1, 1, 20, 16, 12)",
        "network": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 3,
                    "padding": 1},
        "inferer": {"_target_": "monai_patchqueue.GridInferer", "patch_size": [10, 8, 8], "patch_overlap": 2,
                    "overlap_mode": "hann", "padding_mode": "reflect", "batch_size": 2},
        "output_path": str(tmp_path / "shape.json"),
        "run": ["$import json", "$import pathlib", "$import torch",
                "$pathlib.Path(@output_path).write_text(json.dumps(list(@inferer(@image, @network).shape)))"],
    }  # fmt: skip
    config_file = tmp_path / "inference.json"
    config_file.write_text(json.dumps(config))
    run(run_id="run", config_file=str(config_file))
    assert json.loads((tmp_path / "shape.json").read_text()) == [1, 2, 20, 16, 12]
