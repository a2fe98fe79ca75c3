"""On a CUDA device: samplers, crops, grid aggregation, grid inference and the queue with GPU tensors.

Every test here is skipped without CUDA (CI has none); run them on a GPU machine with
``pytest tests/test_cuda.py``. Each compares the GPU result with the same computation on the CPU, so the CPU
tests elsewhere carry over: a sampler draws the same locations from the same seed on either device.
"""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import EnsureTyped

from monai_patchqueue import (
    GridAggregator,
    GridInferer,
    GridSampler,
    LabelSampler,
    LabelSamplerd,
    PatchQueueDataset,
    UniformSampler,
    WeightedSampler,
    WeightedSamplerd,
)
from monai_patchqueue.sampling import label_classes, label_probability_map, weighted_probability_map

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")


@pytest.fixture(autouse=True)
def full_float32_precision():
    """Turn off TF32 convolutions and matrix products (on by default for cuDNN on Ampere and later), whose
    ~1e-4 rounding would hide or fake a difference between the GPU and CPU results."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _subject(size=(40, 36, 32), seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    affine = torch.tensor(
        [[0.0, -2.0, 0.0, 10.0], [1.5, 0.0, 0.0, -20.0], [0.0, 0.0, 3.0, 5.0], [0.0, 0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )
    image = MetaTensor(torch.rand(1, *size, generator=generator), affine=affine)
    label = MetaTensor(torch.randint(0, 3, (1, *size), generator=generator, dtype=torch.uint8), affine=affine)
    # Integer-valued weights: their float32 row sums are exact on both devices, so the draws must agree.
    weights = MetaTensor(torch.randint(0, 5, (1, *size), generator=generator).float(), affine=affine)
    return {"image": image, "label": label, "weights": weights}


def _on_cuda(value):
    return value.to("cuda") if isinstance(value, torch.Tensor) else value


def _assert_same_patches(gpu_patches, cpu_patches):
    assert len(gpu_patches) == len(cpu_patches)
    for gpu, cpu in zip(gpu_patches, cpu_patches):
        assert gpu.device.type == "cuda"
        assert torch.equal(gpu.meta["location"], cpu.meta["location"])
        torch.testing.assert_close(gpu.affine, cpu.affine)
        assert torch.equal(gpu.as_tensor().cpu(), cpu.as_tensor())


@pytest.mark.parametrize(
    ("make", "guide"),
    [
        (lambda: UniformSampler((12, 10, 8), num_samples=16), None),
        (lambda: WeightedSampler((12, 10, 8), num_samples=16), "weights"),
        (lambda: LabelSampler((12, 10, 8), num_samples=16), "label"),
        (lambda: LabelSampler((12, 10, 8), num_samples=16, label_probabilities={0: 1, 1: 2, 2: 3}), "label"),
    ],
)
def test_samplers_draw_the_same_patches_from_gpu_tensors_as_from_cpu_tensors(make, guide):
    subject = _subject()
    extra_cpu = () if guide is None else (subject[guide],)
    extra_gpu = tuple(_on_cuda(v) for v in extra_cpu)
    cpu_patches = make().set_random_state(3)(subject["image"], *extra_cpu)
    gpu_patches = make().set_random_state(3)(_on_cuda(subject["image"]), *extra_gpu)
    _assert_same_patches(gpu_patches, cpu_patches)


def test_a_one_hot_label_on_the_gpu_draws_as_on_the_cpu():
    label = _subject()["label"]
    one_hot = torch.cat([label == value for value in range(3)]).float()
    cpu = LabelSampler(9, num_samples=32).set_random_state(1).randomize(one_hot)
    gpu = LabelSampler(9, num_samples=32).set_random_state(1).randomize(one_hot.cuda())
    assert (cpu == gpu).all()


def test_probability_maps_of_gpu_tensors_equal_the_cpu_maps_on_the_gpu():
    subject = _subject()
    classes = label_classes(1, {1: 1.0, 2: 3.0})
    label_cpu = label_probability_map(subject["label"].as_tensor(), (7, 7, 7), classes)
    label_gpu = label_probability_map(subject["label"].as_tensor().cuda(), (7, 7, 7), classes)
    weights_cpu = weighted_probability_map(subject["weights"].as_tensor()[0], (7, 7, 7))
    weights_gpu = weighted_probability_map(subject["weights"].as_tensor()[0].cuda(), (7, 7, 7))
    assert label_gpu.device.type == weights_gpu.device.type == "cuda"
    torch.testing.assert_close(label_gpu.cpu(), label_cpu)
    torch.testing.assert_close(weights_gpu.cpu(), weights_cpu)


def test_dictionary_samplers_after_ensuretyped_to_cuda_crop_every_key_on_the_gpu():
    subject = _subject()
    keys = ["image", "label", "weights"]
    samplers = {
        "label": lambda: LabelSamplerd(keys, 8, "label", num_samples=6),
        "weighted": lambda: WeightedSamplerd(keys, 8, "weights", num_samples=6),
    }
    for make in samplers.values():
        cpu = make().set_random_state(2)(dict(subject))
        gpu = make().set_random_state(2)(EnsureTyped(keys, device="cuda", track_meta=True)(dict(subject)))
        for cpu_patch, gpu_patch in zip(cpu, gpu):
            assert torch.equal(gpu_patch["location"], cpu_patch["location"])
            _assert_same_patches([gpu_patch[k] for k in keys], [cpu_patch[k] for k in keys])


@pytest.mark.parametrize("mode", ["crop", "average", "hann", "gaussian"])
def test_grid_sampling_and_aggregation_on_the_gpu_give_back_the_image(mode):
    image = _subject()["image"].cuda()
    sampler = GridSampler(12, patch_overlap=4, padding_mode="reflect")
    patches = sampler(image)
    aggregator = GridAggregator(image.shape[1:], 12, patch_overlap=4, overlap_mode=mode, padding_mode="reflect")
    for start in range(0, len(patches), 5):
        batch = patches[start : start + 5]
        outputs = torch.stack([p.as_tensor() for p in batch])
        aggregator.add_batch(outputs, torch.stack([p.meta["location"] for p in batch]))
    output = aggregator.get_output_tensor()
    assert output.device.type == "cuda"
    torch.testing.assert_close(output, image.as_tensor(), rtol=1e-5, atol=1e-6)


def _conv_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 3, padding=1)
    ).eval()


def test_patches_on_gpu_output_on_cpu():
    network = _conv_net()
    image = torch.rand(1, 1, 20, 18, 16)
    with torch.no_grad():
        expected = network(image)
        output = GridInferer(10, patch_overlap=4, sw_device="cuda", device="cpu")(image, network.cuda())
    assert output.device.type == "cpu"
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["crop", "average", "hann", "gaussian"])
def test_grid_inference_of_a_gpu_metatensor_matches_the_cpu_and_keeps_its_metadata(mode):
    network = _conv_net()
    image = MetaTensor(torch.rand(1, 1, 30, 26, 22), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    inferer = GridInferer(12, patch_overlap=4, overlap_mode=mode, padding_mode="constant", batch_size=3)
    with torch.no_grad():
        cpu = inferer(image, network)
        gpu = inferer(image.cuda(), network.cuda())
    assert isinstance(gpu, MetaTensor) and gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.affine, image.affine)
    torch.testing.assert_close(gpu.as_tensor().cpu(), cpu.as_tensor(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["crop", "hann"])
def test_grid_inference_under_autocast_keeps_half_precision_in_crop_mode_and_blends_in_float32(mode):
    network = _conv_net()
    image = torch.rand(1, 1, 30, 26, 22)
    inferer = GridInferer(12, patch_overlap=4, overlap_mode=mode, padding_mode="constant", batch_size=3)
    with torch.no_grad():
        full_precision = inferer(image, network)
        with torch.autocast("cuda", dtype=torch.float16):
            half = inferer(image.cuda(), network.cuda())
    assert half.dtype == (torch.float16 if mode == "crop" else torch.float32)
    torch.testing.assert_close(half.float().cpu(), full_precision, rtol=1e-2, atol=1e-2)


def test_queue_workers_with_a_gpu_transform_raise_naming_the_subject_instead_of_hanging():
    # Under fork, CUDA cannot start in a worker of a process that has started it; otherwise the patches would
    # reach the pack on the GPU, which refuses them: either way a clear error naming the subject.
    torch.cuda.init()
    data = [_subject(size=(16, 16, 16), seed=seed) | {"id": seed} for seed in range(2)]
    queue = PatchQueueDataset(
        data,
        LabelSamplerd(["image", "label"], 8, "label", num_samples=2),
        4,
        2,
        transform=EnsureTyped(["image", "label"], device="cuda", track_meta=True),
        num_workers=1,
    )
    with queue, pytest.raises(RuntimeError, match=r"(?s)subject \d.*(CUDA|cuda)"):
        list(queue)


def test_the_queue_serves_gpu_patches_in_process_with_the_same_stream_as_on_the_cpu():
    data = [_subject(size=(24, 22, 20), seed=seed) | {"id": seed} for seed in range(4)]
    keys = ["image", "label"]

    def served(transform):
        queue = PatchQueueDataset(
            data, LabelSamplerd(keys, 8, "label", num_samples=3), 8, 5, transform=transform, seed=4
        )
        with queue:
            return [patch for patch in queue]

    cpu = served(None)
    gpu = served(EnsureTyped(keys, device="cuda", track_meta=True))
    assert len(gpu) == len(cpu) == 20
    for cpu_patch, gpu_patch in zip(cpu, gpu):
        assert gpu_patch["id"] == cpu_patch["id"]
        assert torch.equal(gpu_patch["location"], cpu_patch["location"])
        _assert_same_patches([gpu_patch[k] for k in keys], [cpu_patch[k] for k in keys])
