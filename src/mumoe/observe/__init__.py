"""Observation: hooks on the normalized MoE view, and calibration windows."""

from .calib import calibration_windows, read_text, tokenize, windows
from .hooks import ExpertEvent, MoEObserver, RouteEvent

__all__ = ["calibration_windows", "read_text", "tokenize", "windows", "ExpertEvent", "MoEObserver", "RouteEvent"]
