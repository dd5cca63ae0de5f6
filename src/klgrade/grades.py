"""The Kellgren-Lawrence scale, defined once: grades 0-4 (a leaf module: imports nothing)."""
from __future__ import annotations

GRADES = (0, 1, 2, 3, 4)
N_GRADES = len(GRADES)
