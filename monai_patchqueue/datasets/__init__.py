"""Example data shipped with the package."""

from .brain import example_brain

__all__ = ["example_brain"]
