"""The many / medium / few split, as fastlt.data exposes it (it lives in fastlt.splits, which every layer imports)."""

from fastlt.splits import FEW_SHOT_MAX, MANY_SHOT_MIN, shot_split

__all__ = ["FEW_SHOT_MAX", "MANY_SHOT_MIN", "shot_split"]
