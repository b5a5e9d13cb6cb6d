"""Objectives, one file per method. Each registers its builder in
``mmssl.registry.OBJECTIVES`` on import; add new modules to the explicit import list below."""

from mmssl.objectives.base import Objective

__all__ = ["Objective"]
