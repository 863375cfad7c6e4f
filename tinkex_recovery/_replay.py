"""Replay for a front-end that re-runs the user's own step function (the Lightning callback), framework-free.

A :class:`Replayer` drives the steps of one loop that trains one or more lineages (a :class:`Lane` each: its
:class:`~tinkex_recovery._ledger.Ledger`, its engine handle, the client the user code calls). It keeps the
steps since the lanes' checkpoints (:class:`Kept`: the step's arguments as first given) and, through a
:class:`Tape` in front of each lane's client, the calls each step made to each run with their results (a
:class:`Recording` per run).

When a lane's run is lost, the rule is one: **every run answers each call it already served from its tape, and
only a run that lacks the step is sent it again.** The lost lane's new run holds the steps before its
checkpoint's; the steps from there on are run again through the user's function, the healthy lanes playing
their recorded answers back (so a healthy run is never trained twice), and the interrupted step runs once more:
a lane whose new run already holds it (a save made in that step, before the failure) plays back what it had
sent and sends the rest (an eval ``forward``, ``save_weights_for_sampler``) to the new run.

A step's arguments are kept as first given: their lists, tuples and dicts are copied (references to the items,
never copies of tensors or data), so a step that pops or replaces items is replayed with the originals. A step
that mutates an item in place cannot be undone and must not.

Threads: everything here runs on the loop's thread, except :meth:`Ledger.step_of` (see the ledger) and the two
flags the other threads raise: :meth:`Replayer.ring` (a run's recovery began or gave up: the loop looks at the
runs before its next step) and :meth:`Replayer.floors_moved` (a save: it recomputes the floors). The loop lowers
a flag before it looks, so a flag raised meanwhile is seen at the next step.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ._clock import Clock
from ._engine import RecoveryEngine, RunHandle, RunState
from ._exceptions import CannotReplay, RecoveryExhausted
from ._futures import resolve
from ._ledger import Ledger, ObservedClient
from ._models import Checkpoint
from ._policy import RecoveryPolicy
from ._recovery import Recovery

__all__ = ["Kept", "Lane", "Recording", "Replayer", "Tape"]

logger = logging.getLogger("tinkex_recovery")

MAX_RERUNS = 3  #: a step that keeps failing on a lost run after this many recoveries lets its error through
Call = tuple[str, Any]  # (method name, what it returned)


_CONTAINERS = frozenset({list, tuple, dict})


def frozen(value: Any) -> Any:
    """``value`` with its lists, tuples and dicts copied (recursively; the items are referenced, not copied)."""
    # Loops, not comprehensions: on CPython 3.11 each comprehension is one more frame, and this runs every step.
    kind = type(value)
    if kind is list or kind is tuple:
        items = list(value)
        for i, item in enumerate(items):
            if type(item) in _CONTAINERS:
                items[i] = frozen(item)
        return items if kind is list else tuple(items)
    if kind is dict:
        copy = dict(value)
        for key, item in copy.items():
            if type(item) in _CONTAINERS:
                copy[key] = frozen(item)
        return copy
    return value


class Recording:
    """The calls one run served in the step under way, with their results (a :class:`Tape` records into it),
    and the playback it answers from first (what a run that already served the step returns again)."""

    __slots__ = ("_queue", "calls")

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._queue: deque[Call] | None = None

    def begin(self, playback: Iterable[Call] | None = None, keep: bool = True) -> None:
        """Start recording a step afresh; answer from ``playback`` first. ``keep=False``: the last step's record is
        not kept anywhere, its list is reused (the common case, one lane: cheaper than a new list each step)."""
        if keep or self._queue is not None or playback:
            self.calls = []
            self._queue = deque(playback) if playback else None
        else:
            self.calls.clear()

    def call(self, name: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``method(*args, **kwargs)`` recorded as ``name``, or the next answer of the playback."""
        queue = self._queue
        if queue:
            recorded, result = queue.popleft()
            if recorded != name:
                raise CannotReplay(
                    f"the step called {name}() on a run that already served it, where its first run called "
                    f"{recorded}(): a step must make the same calls in the same order when it runs again"
                )
        else:
            result = method(*args, **kwargs)
        self.calls.append((name, result))
        return result

    def served(self) -> list[Call]:
        """The recorded calls up to the first whose result is not known good (failed, or still pending)."""
        good: list[Call] = []
        for call in self.calls:
            try:
                resolve(call[1], timeout=0)
            except Exception:
                break
            good.append(call)
        return good


class Tape(ObservedClient):
    """The client as the user code sees it during a fit: the lane's :class:`~tinkex_recovery.ObservedClient`
    (the ledger counts its ``optim_step`` and ``save_state``), every public method call of which is also sent
    through ``recording`` (:meth:`Recording.call`). One proxy, not one in front of the other: each layer's
    lookup would cost as much again. ``*_async`` methods are observed but not recorded (a coroutine cannot be
    awaited twice)."""

    __slots__ = ("_recording",)

    def __init__(self, observed: ObservedClient, recording: Recording) -> None:
        super().__init__(observed.__wrapped__, observed._ledger, observed._generation)
        object.__setattr__(self, "_recording", recording)

    def _wrap(self, name: str, method: Any) -> Any:
        observed = super()._wrap(name, method)
        if name.endswith("_async"):
            return observed
        return functools.partial(self._recording.call, name, observed)


@dataclass(eq=False, slots=True)
class Kept:
    """A step trained: its index, the step counter at its start, its arguments as first given, and the calls
    each lane's run served in it (only while more than one lane could need them)."""

    index: int
    counter: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    tapes: dict[Lane, list[Call]] | None = None

    def call(self, fn: Callable[..., Any]) -> Any:
        return fn(*frozen(self.args), **frozen(self.kwargs))


class Lane:
    """One lineage trained by the loop. ``install(tape)`` puts the tape where the user code finds the client;
    ``on_recovery(recovery, steps)`` reports a recovery taken in (``steps``: the step indices trained again);
    ``on_exhausted(error, cause)`` raises, or returns to stop the loop gracefully."""

    def __init__(
        self,
        replayer: Replayer,
        ledger: Ledger,
        handle: RunHandle,
        client: Any,
        *,
        install: Callable[[Tape], None],
        on_recovery: Callable[[Recovery, range], None],
        on_exhausted: Callable[[RecoveryExhausted, BaseException | None], None],
        fallback_depth: int = 0,
        wait_limit: float = 600.0,
    ) -> None:
        self.replayer, self.ledger, self.handle = replayer, ledger, handle  #: replayer: the loop the lane is part of
        self.install, self.on_recovery, self.on_exhausted = install, on_recovery, on_exhausted
        self.depth, self.wait_limit = fallback_depth, wait_limit
        self.seen = -1  #: the ledger's version when the floor was computed
        self.pending = False  #: one of its newest saves was not answered yet then
        self._floor: int | None = None
        self.engine: RecoveryEngine | None = None
        self.recording: Recording  #: what the run served in the step under way
        self.observed: ObservedClient  #: the run's client, observed by the ledger (calls through it are not recorded)
        self.tape: Tape  #: what the user code calls: the run's client, observed and recorded
        self.adopt(client)

    @classmethod
    def watch(
        cls,
        replayer: Replayer,
        client: Any,
        service: Any,
        *,
        policy: RecoveryPolicy,
        status: Any = None,
        clock: Clock | None = None,
        install: Callable[[Tape], None],
        on_recovery: Callable[[Recovery, range], None],
        on_exhausted: Callable[[RecoveryExhausted, BaseException | None], None],
    ) -> Lane:
        """A lane for ``client``'s run, trained by ``replayer``'s loop: its ledger, and an engine of its own (one
        poll worker) watching the run with the replayer's ``step_of``; closed with :meth:`close`."""
        from ._frontend import wait_limit

        # C-level callables, no Python frame: the ledger reads the position at every optim_step
        ledger = Ledger(position=functools.partial(getattr, replayer, "at"), on_change=replayer.floors_moved)
        engine = RecoveryEngine(policy, status=status, poll_concurrency=1, clock=clock)
        try:
            handle = engine.watch(
                client.model_id, service, step_of=replayer.step_of(ledger), on_unsettled=replayer.ring
            )
            engine.start()
        except BaseException:
            engine.close()
            raise
        depth, limit = policy.fallback_depth, wait_limit(policy)
        lane = cls(replayer, ledger, handle, client, install=install, on_recovery=on_recovery,
                   on_exhausted=on_exhausted, fallback_depth=depth, wait_limit=limit)  # fmt: skip
        lane.engine = engine
        replayer.lanes.append(lane)
        return lane

    def adopt(self, client: Any, step: int | None = None) -> Tape:
        """Train ``client``'s run from now on (``step``: the step it holds, a restored checkpoint's): a new tape in
        front of it, recording afresh, put where the user code finds the client."""
        self.recording = Recording()
        self.observed = self.ledger.adopt(client, step)
        self.tape = Tape(self.observed, self.recording)
        self.install(self.tape)
        return self.tape

    def close(self) -> Any:
        """Stop the lane's engine (its threads), leave the replayer's loop, and return the raw client it ended on."""
        if self.engine is not None:
            self.engine.close()
        if self in self.replayer.lanes:
            self.replayer.lanes.remove(self)
        return self.tape.__wrapped__

    def floor(self, default: int) -> int:
        """The oldest step this lane may have to train again (the engine restores nothing older)."""
        # Recomputed only when it can have moved: a save (or adoption) since, or a save not answered yet then.
        ledger = self.ledger
        if self.pending or ledger.version != self.seen:
            self.seen = ledger.version
            self._floor = ledger.keep_from(self.depth)
            self.pending = ledger.unanswered()
        return default if self._floor is None else self._floor

    def collect(self) -> tuple[list[Recovery], RecoveryExhausted | None]:
        """The recoveries not yet taken in (waiting for one under way), and the exhaustion if recovery gave up."""
        got: list[Recovery] = []
        while not self.handle.settled:
            try:
                got.append(self.handle.wait_for_recovery(self.wait_limit))
            except RecoveryExhausted as exc:
                return got, exc
        return got, None

    def lost(self) -> bool:
        """Poll the run now: is a recovery under way, waiting, or given up?"""
        return self.handle.check_now() or self.handle.state is RunState.EXHAUSTED


class Replayer:
    """The steps of one loop over its lanes; see the module docstring. ``train`` is the user's step function
    (what a replay calls), ``counter()`` reads the loop's step counter and ``set_counter(n)`` sets it (a
    framework's ``global_step``). ``replay=False`` keeps no step and leaves the steps before the interrupted one
    to ``Lane.on_recovery`` (the user replays them); ``retry_failed_step=False`` lets a failed step's error out."""

    def __init__(
        self,
        train: Callable[..., Any],
        *,
        start: int,
        counter: Callable[[], int],
        set_counter: Callable[[int], None],
        replay: bool = True,
        retry_failed_step: bool = True,
    ) -> None:
        self.train = train
        self.at = self.start = start  #: the index of the step under way, or of the next one between steps
        self.ceiling = start  #: the highest step a checkpoint may hold: one past the furthest step begun
        self.alarm = False  #: a run stopped being settled since the last settle (:meth:`ring`): it may need recovery
        self.stale = True  #: a floor may have moved (:meth:`floors_moved`, or a save not answered yet)
        self.counter, self.set_counter = counter, set_counter
        self.replay, self.retry = replay, retry_failed_step
        self.lanes: list[Lane] = []
        self.kept: deque[Kept] = deque()
        self.stopped = False  #: recovery gave up and the loop stops: no step calls a lost run again

    # -- the loop ------------------------------------------------------------------------------------------
    def step(self, *args: Any, **kwargs: Any) -> Any:
        """Run training step ``self.at`` (``train(*args, **kwargs)``): recover what a poll found lost first; a
        failure on a lost run is recovered, the steps since the checkpoint replayed, and the step run again."""
        # Every step pays this path, inside the framework's loop, where each Python frame and each object read
        # costs ~0.4 µs: the common step (every run healthy, no save since) reads flags of the replayer only.
        if self.alarm:
            self.settle()
        if self.stopped:
            return None
        index = self.at
        current = Kept(index, self.counter(), frozen(args), frozen(kwargs) if kwargs else {})
        if index >= self.ceiling:
            self.ceiling = index + 1
        if self.stale:
            self._bound(index)
        output = self._attempt(self.train, args, kwargs, current)
        if self.replay:
            if len(self.lanes) > 1:
                current.tapes = {lane: lane.recording.calls for lane in self.lanes}
            self.kept.append(current)
        self.at = index + 1
        return output

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run ``fn`` between two training steps (a validation step, a hook): recovered the same way, the steps
        since the checkpoint replayed before ``fn`` runs again on the new run."""
        self.settle()
        if self.stopped:
            return None
        return self._attempt(fn, args, kwargs, None)

    def settle(self, check: bool = False) -> None:
        """Between steps: take in (and replay for) what a poll found lost, if a run stopped being settled since
        (:meth:`ring`); ``check``: poll every run first. Again while one rings meanwhile (another lane's run found
        lost during a replay): the step that follows is sent to no run known to be lost."""
        while (check or self.alarm) and not self.stopped:  # the common case, nothing happened to any run, skips it
            self.alarm = False  # first: a run unsettled from now on rings again
            lost = [lane for lane in self.lanes if (check and lane.lost()) or not lane.handle.settled]
            check = False
            if lost:
                counter = self.counter()
                self._take(lost, None, None, {})
                self.set_counter(counter)

    def ring(self) -> None:
        """A lane's run stopped being settled (a recovery started, or recovery gave up), told on the thread that
        changed it, before any of its events is delivered: :meth:`settle` looks at the runs at the next step or
        call."""
        self.alarm = True

    def floors_moved(self) -> None:
        """A ledger's saves changed (any thread): :meth:`_bound` recomputes the floors at the next step."""
        self.stale = True

    # -- inside -----------------------------------------------------------------------------------------------
    def _attempt(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], step: Kept | None) -> Any:
        keep = len(self.lanes) > 1  # only then may a replay need this step's record
        for lane in self.lanes:
            lane.recording.begin(None, keep)
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            failure = exc
        return self._rerun(fn, args, kwargs, step, failure)  # outside the handler: a rerun's error is not chained

    def _rerun(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], step: Kept | None, exc: Exception
    ) -> Any:
        """``fn`` (``step``, or a call between steps) failed with ``exc``: if a run was lost, recover, replay and
        run it again (a step with its arguments as first given), up to :data:`MAX_RERUNS` times; else let ``exc``
        out."""
        for rerun in range(MAX_RERUNS + 1):
            lost = self._lost(exc) if self.retry and rerun < MAX_RERUNS else []
            if not lost:
                raise exc
            logger.warning("a step failed on a lost run (%s); recovering", type(exc).__name__)
            counter = self.counter()
            self._take(lost, step, exc, {lane: lane.recording.served() for lane in self.lanes})
            self.set_counter(step.counter if step is not None else counter)
            if self.stopped:  # gave up: the step's own optimizer steps never happened on a live run
                return None
            if step is not None:
                args, kwargs = frozen(step.args), frozen(step.kwargs)
            try:
                return fn(*args, **kwargs)
            except Exception as again:
                exc = again
        raise AssertionError("unreachable")

    def _take(
        self, lost: list[Lane], step: Kept | None, cause: BaseException | None, served: dict[Lane, list[Call]]
    ) -> None:
        """:meth:`_recover`, again for a run lost during its replay."""
        for _ in range(MAX_RERUNS):
            try:
                self._recover(lost, step, cause, served)
                return
            except (CannotReplay, RecoveryExhausted):
                raise
            except Exception as exc:
                lost = self._lost(exc) if self.retry else []
                if not lost:
                    raise
                cause = exc
        self._recover(lost, step, cause, served)

    def _lost(self, exc: BaseException) -> list[Lane]:
        lost = []
        for lane in self.lanes:
            if lane.lost():
                lost.append(lane)
            elif lane.handle.observed is not None:  # observe mode: say what recover mode would do, change nothing
                from ._integration import would_do
                from ._retry import describe

                logger.warning(
                    "(observe mode) a step failed on run %s, which is corrupted (%s); %s; the error is let through",
                    lane.handle.observed,
                    describe(exc),
                    would_do(lane.handle, 60.0),
                )
        return lost

    def _bound(self, index: int) -> None:
        """At a step's start, when a floor may have moved (:meth:`step` looks; the :attr:`ceiling`, nothing ahead
        of the steps taken, it moves itself): the engine may restore only what the kept steps can replay from (a
        floor, in each ledger's window); the kept steps older than every floor are dropped, unless a recovery,
        possibly chosen against the previous floor, is under way (they go at the step after it is taken in: the
        run it adopts moves the floors again). Looks again at the next step while a save is not answered yet (it
        may still fail)."""
        self.stale = False  # first: a save from now on marks it again
        lowest, pending = index, False
        for lane in self.lanes:
            floor = min(lane.floor(self.start), index) if self.replay else None  # no replay: the module's to do
            if floor != lane.ledger.book.floor:
                lane.ledger.window(floor=floor)
            if floor is not None and floor < lowest:
                lowest = floor
            pending = pending or lane.pending
        kept = self.kept
        if kept and kept[0].index < lowest and all(lane.handle.settled for lane in self.lanes):
            while kept and kept[0].index < lowest:
                kept.popleft()
        if pending:
            self.stale = True

    def step_of(self, ledger: Ledger) -> Callable[[Checkpoint], int | None]:
        """The engine's ``step_of`` for a lane: the ledger's rule, and no step beyond :attr:`ceiling`. Any thread:
        the ceiling is one int that only grows during a fit, so a stale read refuses more, never less."""

        def step_of(checkpoint: Checkpoint) -> int | None:
            step = ledger.step_of(checkpoint)
            return None if step is None or step > self.ceiling else step

        return step_of

    def _recover(
        self, lost: list[Lane], step: Kept | None, cause: BaseException | None, served: dict[Lane, list[Call]]
    ) -> None:
        """Take in the recoveries of ``lost``, then replay the kept steps from the lowest resume point; in a failed
        ``step``, load each run's playback for its next attempt. ``step`` None: between steps."""
        at = self.at
        if step is not None:  # what the failed step counted never happened on a live run
            self.set_counter(step.counter)
        resumes: dict[Lane, int] = {}
        for lane in lost:
            recoveries, exhausted = lane.collect()
            for recovery in recoveries:
                resume = self._resume_of(recovery, at, step)
                lane.adopt(recovery.client, resume)
                resumes[lane] = resume
                if self.replay and resume < at:
                    self.set_counter(self._counter_at(resume, step))
                lane.on_recovery(recovery, range(resume, max(at, resume)))
            if exhausted is not None:
                self.stopped = True  # on_exhausted raises, or returns for a graceful stop
                lane.on_exhausted(exhausted, cause)
                return
        if self.replay:
            start = min(resumes.values(), default=at)
            todo = [k for k in self.kept if k.index >= start]
            if todo:
                self.kept = deque(k for k in self.kept if k.index < start)
                logger.info("replaying %d step(s) from step %d on the new run(s)", len(todo), start)
            for i, kept in enumerate(todo):
                try:
                    self._replay_one(kept, resumes)
                except BaseException:
                    self.kept.extend(todo[i:])
                    self.at = at
                    raise
            self.at = at
        # What runs next (the failed step or call, once more) starts afresh on a run that lacks it, and from what
        # it had served on a run that holds it (a healthy run; a new run restored from a save made in the step).
        for lane in self.lanes:
            again = resumes.get(lane)
            fresh = again is not None and (step is None or again <= step.index)
            lane.recording.begin(None if fresh else served.get(lane))

    def _replay_one(self, kept: Kept, resumes: dict[Lane, int]) -> None:
        self.at = kept.index
        self.set_counter(kept.counter)
        for lane in self.lanes:
            resume = resumes.get(lane)
            lane.recording.begin(None if resume is not None and resume <= kept.index else (kept.tapes or {}).get(lane))
        kept.call(self.train)
        if len(self.lanes) > 1:
            kept.tapes = {lane: lane.recording.calls for lane in self.lanes}
        self.kept.append(kept)

    def _resume_of(self, recovery: Recovery, at: int, step: Kept | None) -> int:
        resume = recovery.step
        where = f"run {recovery.new_run_id} was restored from {recovery.checkpoint.tinker_path}"
        if resume is None:
            raise CannotReplay(f"{where}, whose step is not known")
        if resume > at + (1 if step is not None else 0):
            raise CannotReplay(f"{where} (step {resume}), ahead of the {at} step(s) taken")
        oldest = self.kept[0].index if self.kept else at
        if self.replay and resume < min(oldest, at):
            raise CannotReplay(f"{where} (step {resume}), older than the steps kept (from step {oldest})")
        return resume

    def _counter_at(self, index: int, step: Kept | None) -> int:
        if step is not None and step.index == index:
            return step.counter
        return next((k.counter for k in self.kept if k.index == index), self.counter())
