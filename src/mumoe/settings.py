"""The run's settings, in one object: what the CLI's global flags set and the library reads (no other module
keeps a flag of its own). Caches that belong to tensors are kept here too, keyed by the tensor and dropped with it.

    from mumoe.settings import SETTINGS
    SETTINGS.quiet = True             # --quiet: only a command's result (and errors); no progress bars
    SETTINGS.trust_remote_code = True  # --trust-remote-code
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any


@dataclass
class Settings:
    quiet: bool = False  # --quiet: only the command's result (and errors); no progress lines or bars
    trust_remote_code: bool = False  # --trust-remote-code: let transformers run code a checkpoint ships


SETTINGS = Settings()


class TensorCache:
    """Values kept per tensor (or Parameter) and dropped when the tensor is: what used to be attributes stashed on
    Parameters. Keyed by identity — tensors compare elementwise, so a WeakKeyDictionary cannot hold them."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, Any]] = {}

    def get(self, t) -> Any:
        e = self._entries.get(id(t))
        return e[1] if e is not None and e[0]() is t else None

    def set(self, t, value) -> None:
        key, entries = id(t), self._entries
        entries[key] = (weakref.ref(t, lambda _ref, k=key: entries.pop(k, None)), value)

    def pop(self, t) -> Any:
        value = self.get(t)
        if value is not None:
            del self._entries[id(t)]
        return value

    def __len__(self) -> int:
        return len(self._entries)
