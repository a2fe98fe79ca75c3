"""Shared fixtures: the embedded brain, loaded once."""

from __future__ import annotations

import pytest
import torch
from monai.transforms import LoadImaged

from monai_patchqueue import example_brain


@pytest.fixture(scope="session")
def brain() -> dict:
    """The embedded brain as channel-first MetaTensors (image float32, label 0/1/2)."""
    return LoadImaged(["image", "label"], ensure_channel_first=True)(example_brain())


@pytest.fixture
def volume() -> dict:
    """A small 3D subject: random image, 3-class label, a non-trivial affine and a non-key entry."""
    from monai.data import MetaTensor

    generator = torch.Generator().manual_seed(0)
    affine = torch.tensor(
        [[0.0, -2.0, 0.0, 10.0], [1.5, 0.0, 0.0, -20.0], [0.0, 0.0, 3.0, 5.0], [0.0, 0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )
    image = MetaTensor(torch.rand(1, 20, 18, 16, generator=generator), affine=affine)
    label = MetaTensor(torch.randint(0, 3, (1, 20, 18, 16), generator=generator), affine=affine)
    return {"image": image, "label": label, "subject": "s-01"}
