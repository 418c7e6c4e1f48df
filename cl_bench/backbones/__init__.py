"""Backbones: feature extractors with a pooled embedding of size ``feat_dim``.

A new backbone is one builder (returning a :class:`Backbone`) plus one ``cl_bench/conf/backbone/NAME.yaml``.
"""

from cl_bench.backbones.base import Backbone, DataConfig

__all__ = ["Backbone", "DataConfig"]
