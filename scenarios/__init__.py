"""Scenario generators: dataset + seed -> :class:`clbench.scenarios.base.Stream`.

Each module registers its builder with ``@register_scenario``; build one from a config with
:func:`build_stream`.
"""

from clbench.scenarios.base import Experience, PixelPermutation, Rotation, Stream

__all__ = ["Experience", "PixelPermutation", "Rotation", "Stream", "build_stream"]


def build_stream(cfg, seed: int, cache_dir: str | None = None) -> Stream:
    """Build the stream described by a scenario config section (``cfg.name`` picks the builder)."""
    from clbench.registry import SCENARIOS

    return SCENARIOS.get(cfg.name).obj(cfg, seed=seed, cache_dir=cache_dir)
