"""Shared type aliases. Every shape, chunk and halo is (z, y, x)."""

from __future__ import annotations

ShapeZYX = tuple[int, int, int]
