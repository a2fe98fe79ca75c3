"""The embedded example brain: a 2 mm crop of the MNI ICBM152 2009a template with a 3-class tissue label."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["example_brain"]

_FOLDER = "mni152"
IMAGE_FILE = "mni152_2mm_t1.nii.gz"
LABEL_FILE = "mni152_2mm_tissue.nii.gz"
CLASS_NAMES = ("background", "grey matter", "white matter")


def example_brain() -> dict[str, str]:
    """Return a MONAI datalist entry for the embedded example brain.

    The image is a T1-weighted MNI ICBM152 2009 template at 2 mm, cropped to the head; the label has
    0 background, 1 grey matter and 2 white matter (see the NOTICE file beside the data for the copyright
    and permission notice). Nothing is downloaded: the files ship inside the package.

    Returns:
        ``{"image": path, "label": path}`` to absolute NIfTI paths.

    Example:
        >>> from monai.transforms import LoadImaged
        >>> data = LoadImaged(["image", "label"], ensure_channel_first=True)(example_brain())
        >>> tuple(data["image"].shape), sorted(data["label"].unique().int().tolist())
        ((1, 73, 91, 78), [0, 1, 2])
    """
    folder = Path(str(resources.files(__package__).joinpath(_FOLDER)))
    entry = {"image": folder / IMAGE_FILE, "label": folder / LABEL_FILE}
    for key, path in entry.items():
        if not path.is_file():
            raise FileNotFoundError(f"the example brain's {key} file {path} is missing; reinstall monai_patchqueue")
    return {key: str(path) for key, path in entry.items()}
