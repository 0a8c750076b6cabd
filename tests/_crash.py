"""An interruption for the resume tests: an ``on_progress`` callback that raises part-way through a run."""

from __future__ import annotations


class Crash(Exception):
    pass


def crash_in_second_epoch():
    """A callback raising Crash at the second step of the second epoch (epoch index 1), after the first epoch's
    checkpoint is written and before the second one's."""
    seen = []

    def on_progress(p: dict) -> None:
        if p["epoch"] == 1:
            seen.append(p["step"])
            if len(seen) == 2:
                raise Crash

    return on_progress
