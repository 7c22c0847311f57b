"""Typed errors. Each message is one line that says what went wrong and what to do.

The CLI turns any ``EmbedkitError`` into that one line on stderr and exit code 1; anything
else is a bug in embedkit and keeps its traceback.
"""

from __future__ import annotations


class EmbedkitError(Exception):
    """Base class for every error a user can cause and fix."""


class InvalidArgumentError(EmbedkitError, ValueError):
    """An argument has a value outside its allowed set; the message lists the valid values."""


class WeightsUnavailableError(EmbedkitError):
    """No weight source worked for a model; the message names the ways to provide weights."""


class WeightsMismatchError(EmbedkitError):
    """A weights file does not fit the model (missing tensors or wrong shapes)."""


class StoreError(EmbedkitError):
    """A store is missing, unreadable or corrupt."""


class StoreLockedError(StoreError):
    """Another process is writing to the store."""


class StoreMismatchError(StoreError):
    """The store was made with another model, weights or preprocessing."""


class StoreChangedError(StoreError):
    """A store opened without its vectors changed those rows before they were read."""


class IndexStateError(EmbedkitError):
    """An index is missing, corrupt, or was built from another store state."""


class IndexLockedError(IndexStateError):
    """Another process kept the index locked (building or updating it) past the wait limit."""


class ProbeError(EmbedkitError):
    """A probe cannot be trained, loaded or applied (bad labels, model mismatch, ...)."""


class ImageFileError(EmbedkitError):
    """An image file given to ``embed``, ``search``, ``classify`` or ``probe predict`` cannot be
    decoded. ``reason`` is the failure reason extraction would record for the same file (one of
    ``embedkit.FAILURE_REASONS``), ``detail`` the decoder's own words."""

    def __init__(self, path: str, reason: str, detail: str) -> None:
        super().__init__(
            f"cannot use image {path}: {reason} ({detail}); extraction would record this file "
            f"as failed with reason {reason}. Pass a readable JPEG, PNG, GIF, WebP, TIFF or BMP"
        )
        self.path = path
        self.reason = reason
        self.detail = detail


class RayClusterError(EmbedkitError):
    """The Ray cluster cannot be reached, refuses this client, cannot fit the work, or its nodes
    cannot read the images; the message names the address or node and what to check."""
