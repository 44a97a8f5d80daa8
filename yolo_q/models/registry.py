"""Name -> builder registries (detectron2/timm style)."""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Optional


class Registry:
    def __init__(self, name: str):
        self.name = name
        self._items: Dict[str, Callable] = {}

    def register(self, name: Optional[str] = None):
        def deco(obj):
            key = name or obj.__name__
            if key in self._items:
                raise KeyError(f"{self.name}: '{key}' is already registered")
            self._items[key] = obj
            return obj
        return deco

    def get(self, name: str) -> Callable:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise KeyError(f"unknown {self.name} '{name}'{hint}; "
                           f"registered: {', '.join(sorted(self._items))}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def names(self):
        return sorted(self._items)


BLOCKS = Registry("block")
BACKBONES = Registry("backbone")
NECKS = Registry("neck")
HEADS = Registry("head")
