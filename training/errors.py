"""Typed errors. Every user-facing failure is a ``SpatialError``; the CLI prints its message and exits 2."""

from __future__ import annotations


class SpatialError(Exception):
    """Base class: an error whose message is meant for the user (no traceback)."""


class DataError(SpatialError):
    """A single-cell file, manifest or table is missing, malformed or inconsistent."""


class ConfigError(SpatialError):
    """``params.yaml`` or a ``--set`` override is invalid."""


class ModelError(SpatialError):
    """A model name, checkpoint or model URI cannot be used."""


class TrainingError(SpatialError):
    """Training cannot go on (too few cells, an empty class, a NaN loss...)."""
