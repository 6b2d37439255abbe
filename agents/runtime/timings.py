"""When each step of a turn before its first token happened, as wall-clock marks.

A turn's marks travel with it (in the hand-off task, the turn task and the run state) and are
saved in ``Turn.timings`` with its final state, so a slow start can be explained per step
(``tests/bench/bench_chat.py`` prints the breakdown per percentile). Marks are ``time.time()``
seconds (processes on one host share that clock; across hosts the steps between processes
carry the clocks' offset). Steps, in the order of a turn:

| mark | when |
|------|------|
| ``received`` | the web process got the message (socket frame, or the REST view began) |
| ``accepted`` | the message and its queued turn were committed |
| ``enqueued`` | the task was handed to the broker (the socket's hand-off, or the turn task) |
| ``dispatched`` | a worker began the task |
| ``claimed`` | the turn was running (the claim committed) |
| ``retrieved`` | retrieval finished (agents with collections only) |
| ``prompted`` | the prompt was built and the budget reserved |
| ``model_called`` | the request to the model was about to be sent |
| ``first_token`` | the first text of the model was read |
| ``first_published`` | that text was published to the session's clients |
"""

from __future__ import annotations

import time

STEPS = ("received", "accepted", "enqueued", "dispatched", "claimed", "retrieved", "prompted", "model_called",
         "first_token", "first_published")

Marks = dict[str, float]


def mark(marks: Marks | None, step: str, at: float | None = None) -> None:
    """Set ``marks[step]`` to ``at`` (default: now) unless it is set already (a turn resumed after
    an approval keeps its first marks). ``marks`` ``None`` does nothing."""
    if marks is not None and step not in marks:
        marks[step] = round(time.time() if at is None else at, 6)


def marks_clean(raw: object) -> Marks:
    """The known steps of ``raw`` (task arguments cross a process boundary) as floats; anything
    else is dropped."""
    if not isinstance(raw, dict):
        return {}
    out: Marks = {}
    for step in STEPS:
        value = raw.get(step)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[step] = float(value)
    return out
