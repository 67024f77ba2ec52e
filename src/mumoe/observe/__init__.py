"""Observation: calibration windows, and the one runner that turns forward (+ backward) passes into statistics."""

from .calib import calibration_windows, read_text, tokenize, windows
from .collectors import AtomStats, ExpertStats, InputNorms, LayerStats, OnRoute
from .runner import (
           Collector,
           ExpertEvent,
           MoEObserver,
           Observation,
           Routed,
           RouteEvent,
           run,
)

__all__ = [
           "AtomStats",
           "Collector",
           "ExpertEvent",
           "ExpertStats",
           "InputNorms",
           "LayerStats",
           "MoEObserver",
           "Observation",
           "OnRoute",
           "RouteEvent",
           "Routed",
           "calibration_windows",
           "read_text",
           "run",
           "tokenize",
           "windows",
]
