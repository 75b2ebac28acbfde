"""Progress bars for long work, with one switch for all of them.

Every long step (harvest, tokenizing, training, store builds per shard and overall,
evaluation, sweeps) shows a tqdm bar with a total and the time left, on stderr so that
`--json` output stays clean. Bars are off when the caller says so (`progress=False`),
when `silo --quiet` is given, or when the environment has `TQDM_DISABLE=1` (tqdm's own
switch, which tqdm itself ignores once a caller passes `disable`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tqdm import tqdm

_QUIET = [False]


def set_quiet(quiet: bool) -> None:
    """Turn every bar of this process off (`silo --quiet`)."""
    _QUIET[0] = quiet


def enabled(wanted: bool = True) -> bool:
    """Whether a bar the caller wants is shown."""
    off = os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")
    return wanted and not _QUIET[0] and not off


def bar(iterable: Iterable | None = None, *, desc: str, total: float | None = None, unit: str = "it",
        progress: bool = True, **kwargs) -> tqdm:
    """A tqdm bar over `iterable` (or updated by hand), shown only when `enabled`. Give
    `total` whenever the amount of work is known: a bar without one shows no time left."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not enabled(progress), dynamic_ncols=True,
                **kwargs)
