"""Step indices that can be rewound: what ``guard.steps(iterable)`` walks over.

The iterable yields step indices: ints, strictly increasing (a ``range`` is the usual case). A recovery
restores a checkpoint saved with ``step=k`` ("k steps trained"), and iteration continues with the first
element ``>= k``: a sequence is simply re-indexed (``range`` in O(1)); any other iterable is remembered as it
is consumed (one int per step) so the indices already yielded can be replayed.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from operator import length_hint
from types import TracebackType
from typing import Protocol

from tinkex_recovery import ResumeBeforeFirstStep

__all__ = ["Judge", "Step", "StepCursor"]


class Judge(Protocol):
    """Decides whether an exception raised inside a step is suppressed (the run was lost and is recovered):
    the same decision, waited for by blocking (``with step:``) or by awaiting (``async with step:``)."""

    def _judge(self, step: Step, exc: BaseException) -> bool: ...

    async def _judge_async(self, step: Step, exc: BaseException) -> bool: ...


class StepCursor:
    """A position in a sequence of step indices that can move back to a checkpoint's step.

    A loop takes its next index with ``next(cursor.iterator)``. For a rising ``range`` (ints, strictly
    increasing by construction: nothing to check) that is the range's own iterator, so a step costs no Python
    call here, and the position is read back from what the iterator has left; any other iterable is checked
    index by index as it is consumed.
    """

    def __init__(self, iterable: Iterable[int]) -> None:
        if isinstance(iterable, str | bytes) or not isinstance(iterable, Iterable):
            raise TypeError(f"steps() needs an iterable of step indices (ints), got {type(iterable).__name__}")
        self._items: Sequence[int]
        self._rest: Iterator[int] | None
        if isinstance(iterable, Sequence):
            self._items, self._rest = iterable, None
        else:
            self._items, self._rest = [], iter(iterable)
        self._pos = 0  # position of the next index to yield (when iterator is self)
        self._floor: int | None = None  # after a seek past the remembered indices: skip fresh ones below it
        self._range = iterable if isinstance(iterable, range) and iterable.step > 0 else None
        #: what the loop calls ``next()`` on for the next index
        self.iterator: Iterator[int] = iter(self._range) if self._range is not None else self

    @property
    def pos(self) -> int:
        """The position of the next index to yield."""
        if self._range is not None:
            return len(self._range) - length_hint(self.iterator)
        return self._pos

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        if self._range is not None:
            return next(self.iterator)
        while True:
            if self._pos < len(self._items):
                index = self._items[self._pos]
            elif self._rest is not None:
                index = next(self._rest)
                assert isinstance(self._items, list)
                self._items.append(index)
            else:
                raise StopIteration
            self._check(index)
            self._pos += 1
            if self._floor is None or index >= self._floor:
                self._floor = None
                return index

    @property
    def current(self) -> int | None:
        """The index last yielded (after a :meth:`seek`, the one before the resume point); None before any."""
        pos = self.pos
        return self._items[pos - 1] if pos > 0 else None

    def _check(self, index: object) -> None:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"steps() iterates over step indices (ints), got {index!r}")
        pos = self._pos
        if pos > 0 and self._items[pos - 1] >= index:
            raise ValueError(f"step indices must be strictly increasing; {index} follows {self._items[pos - 1]}")

    def seek(self, step: int) -> None:
        """Continue with the first index ``>= step``."""
        if len(self._items) == 0 and self._rest is None:
            return
        if len(self._items) and step < self._items[0]:
            raise ResumeBeforeFirstStep(
                f"cannot resume at step {step}: the iterable given to steps() starts at {self._items[0]}; "
                "iterate over every step from the checkpoint on (e.g. one steps() over the global step index)"
            )
        pos = bisect_left(self._items, step)
        if self._range is not None:
            self.iterator = iter(self._range[pos:])
            return
        self._pos = pos
        self._floor = step if pos == len(self._items) and self._rest is not None else None


class Step:
    """One step of a guarded loop. ``with step:`` (or ``async with step:`` in a coroutine) is where a failure is
    judged: caused by the run being corrupted (recovered, suppressed, and the loop rewound) or not (propagated
    unchanged)."""

    __slots__ = ("_entered", "_judge", "index", "resumed")

    def __init__(self, judge: Judge, index: int, resumed: bool = False) -> None:
        self._judge = judge
        self._entered = False
        self.index = index  #: the step index, an element of the iterable given to steps()
        #: True for the first step after the guard took in a recovery (the loop was rewound to a checkpoint and
        #: trains a new run): anything the loop still holds from the lost run, futures in flight above all, is
        #: void and must be dropped, never awaited for a result.
        self.resumed = resumed

    def __enter__(self) -> Step:
        if self._entered:
            raise RuntimeError(f"step {self.index} was already entered; each step is entered once")
        self._entered = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        return exc is not None and self._judge._judge(self, exc)

    async def __aenter__(self) -> Step:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        return exc is not None and await self._judge._judge_async(self, exc)

    def __repr__(self) -> str:
        return f"<Step index={self.index}{' resumed' if self.resumed else ''}>"
