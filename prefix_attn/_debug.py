"""Test aids. Not part of the public API."""
from ._ops import set_poison_outputs as poison_outputs  # noqa: F401
