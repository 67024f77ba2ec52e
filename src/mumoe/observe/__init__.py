"""Observation: calibration windows, and the one runner that turns forward (+ backward) passes into statistics."""

from .calib import calibration_windows, read_text, tokenize, windows
from .collectors import AtomStats, ExpertStats, InputNorms, LayerStats, OnRoute
from .runner import Collector, ExpertEvent, MoEObserver, Observation, RouteEvent, Routed, run

__all__ = ["calibration_windows", "read_text", "tokenize", "windows", "AtomStats", "ExpertStats", "InputNorms",
           "LayerStats", "OnRoute", "Collector", "ExpertEvent", "MoEObserver", "Observation", "RouteEvent", "Routed",
           "run"]
