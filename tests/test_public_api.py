"""The public names: each documented with a runnable example (run by --doctest-modules) and in the README."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import monai_patchqueue

PUBLIC = [name for name in monai_patchqueue.__all__ if not isinstance(getattr(monai_patchqueue, name), str)]
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_an_example_in_its_docstring(name):
    docstring = inspect.getdoc(getattr(monai_patchqueue, name)) or ""
    assert "Example:" in docstring and ">>> " in docstring, f"{name} needs an `Example:` with doctest lines"


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_is_in_the_readme_api_table(name):
    api_table = README[README.index("## Public API") : README.index("## Grid inference")]
    assert f"`{name}" in api_table, f"{name} is missing from the README's API table"
