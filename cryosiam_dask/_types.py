"""Shared type aliases. Every shape, chunk and halo is (z, y, x)."""

from __future__ import annotations

ShapeZYX = tuple[int, int, int]

DEFAULT_CHUNKS: ShapeZYX = (128, 256, 256)
"""Default (z, y, x) chunk of every stage: 32 MiB of float32, several network patches per chunk."""
