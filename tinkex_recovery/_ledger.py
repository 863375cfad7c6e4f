"""The ledger of one lineage: what its current run holds, and which checkpoint a loop can resume from.

Every front-end (the sync and async guard, the Lightning callback) keeps one :class:`Ledger` per watched
lineage and hands its loop an :class:`ObservedClient`, a proxy of the training client that tells the ledger of
each ``optim_step`` and ``save_state`` sent through it. So a checkpoint saved with a bare ``save_state(name)``
holds a known step: the ledger writes it into the checkpoint's user_metadata (:data:`RESUME_KEY`), where a new
process finds it too. The one rule "where does a loop restored from this checkpoint resume, if it can" is
:meth:`Ledger.step_of`, the engine's ``step_of`` hook.

What a step is. A loop walks step indices (``0, 1, 2, ...``: the guard's ``steps()``, Lightning's batches);
the integration tells the ledger which one is under way (``position``). A checkpoint's step is the index of the
first step a loop restored from it must train: ``i + 1`` when the last ``optim_step`` sent before the save was
sent during step ``i`` (a save at the end of step ``i``, or at the start of step ``i + 1`` as tinker-cookbook
saves); for a run no ``optim_step`` was sent to yet, the step it was restored at, or else the step under way
(a loop starts on a run that holds the steps before its first one).

Order, not results. The SDK sends a client's requests in the order they were made, so a save made after an
``optim_step`` holds it, whether or not anything was read from either future; the ledger counts at submission.

Threads. The front-end calls :meth:`Ledger.adopt`, :meth:`Ledger.window` and :meth:`Ledger.keep_from` on the
loop's thread (or event loop); the proxy's calls may come from any thread, and each is counted under the ledger's
lock together with the client call that sends it, so the ledger's order is the client's. :meth:`Ledger.step_of`
runs on the engine's threads: it reads only the checkpoint and a :class:`Book`, a frozen snapshot replaced whole
(at each save, each adopted run, each change of the window), never fields being changed.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from types import MappingProxyType, MethodType
from typing import Any

from ._models import STEP_KEY, Checkpoint, parse_step

__all__ = ["OBSERVED", "RESUME_KEY", "Book", "Ledger", "ObservedClient"]

logger = logging.getLogger("tinkex_recovery")

RESUME_KEY = "tinkex_recovery.step"
"""The checkpoint user_metadata key the ledger writes on every save made through an :class:`ObservedClient`: the
checkpoint's step (the first step a loop restored from it trains). A ``step`` the user records wins over it."""

#: Saves the ledger remembers (for :meth:`Ledger.keep_from`, and by path for clients that take no user_metadata):
#: the newest ones only (a recovery falls back a few checkpoints at most), so a long run's book does not grow.
REMEMBERED = 64

_NO_NAMES: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Book:
    """What :meth:`Ledger.step_of` decides against: a frozen snapshot, replaced whole by the loop's thread."""

    #: steps of checkpoints saved through the ledger whose save could not carry it in its user_metadata (a
    #: client whose ``save_state`` takes none), by tinker path: the newest :data:`REMEMBERED`
    saved: Mapping[str, int] = field(default_factory=lambda: _NO_NAMES)
    #: tinker paths of checkpoints that cut a step in two (saved between two of its optim_steps)
    split: frozenset[str] = frozenset()
    floor: int | None = None  #: the lowest step the front-end can train again (None: any)
    ceiling: int | None = None  #: the highest step a resume may start at (None: any)


_SENDING = object()  # a save's future before its call returned
_FAILED = object()  # the call raised (or its coroutine was cancelled): nothing is known to be saved


class _Save:
    """A checkpoint saved (or restored) through the ledger: its path, its step, and what the save's call returned
    (None: a checkpoint known to exist: the one a run was restored from, or a save answered as saved). Only a
    save that succeeded counts for :meth:`Ledger.keep_from`."""

    __slots__ = ("future", "path", "step")

    def __init__(self, path: str | None, step: int, future: Any = _SENDING) -> None:
        self.path, self.step, self.future = path, step, future

    def state(self) -> bool | None:
        """True: saved; False: the save failed (or its call did); None: not answered yet."""
        future = self.future
        if future is None:
            return True
        if future is _FAILED:
            return False
        if future is _SENDING:
            return None
        inner = future.future() if callable(getattr(type(future), "future", None)) else future  # the SDK's APIFuture
        if not isinstance(inner, Future):
            return True  # a value, or a future of unknown make: taken as saved
        if not inner.done():
            return None
        saved = not inner.cancelled() and inner.exception() is None
        self.future = None if saved else _FAILED  # answered for good: asked again at every floor, read once
        return saved


class Ledger:
    """The book of one lineage; see the module docstring.

    ``position()`` is the index of the step under way (None outside the loop), read on the loop's thread when a
    call is observed; ``recorded(tinker_path)`` a step the user recorded elsewhere (tinker-cookbook's
    ``checkpoints.jsonl``), consulted by :meth:`step_of` before the ledger's own. ``on_change()`` is called at
    every bump of :attr:`version`, on the thread that made the save and under the ledger's lock (so it must not call
    the ledger): a front-end then need not look at every step.
    """

    def __init__(
        self,
        *,
        position: Callable[[], int | None] | None = None,
        recorded: Callable[[str], int | None] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        for name, hook in (("position", position), ("recorded", recorded), ("on_change", on_change)):
            if hook is not None and not callable(hook):
                raise TypeError(f"{name} must be callable, got {type(hook).__name__}")
        self._position = position or (lambda: None)
        self._recorded = recorded
        self._on_change = on_change or (lambda: None)
        self._lock = threading.Lock()  # orders the observed calls as the client sends them
        self._generation = 0  # one per adopted run: calls through an older run's proxy are not counted
        self._step: int | None = None  # the step a checkpoint saved now holds; None: not known
        self._sent = 0  # optim_steps sent to the current run through the ledger
        self._last_tag: int | None = None  # the step under way when the last optim_step was sent
        self._cut: list[str] = []  # paths of saves made during step _last_tag after one of its optim_steps
        self._run_id: str | None = None  # the current run (its saves' paths are tinker://{run_id}/weights/{name})
        self._saves: list[_Save] = []  # the lineage's checkpoints a recovery may restore, oldest first
        #: bumped whenever the saves change (a save sent, a run adopted from a checkpoint): a front-end that derives
        #: something from them (:meth:`keep_from`) looks again only then, or while :meth:`unanswered` holds
        self.version = 0
        self._known = True  # False after a load_state: what the run holds is no longer the ledger's to say
        self.book = Book()

    # -- what the front-end tells it -----------------------------------------------------------------------
    def adopt(self, client: Any, step: int | None = None) -> ObservedClient:
        """Train ``client``'s run from now on and return the proxy to hand the loop. ``step``: the step the run
        holds (a restored checkpoint's); None for the run the loop started with (it holds the steps before the
        first one the loop runs). Calls through proxies of earlier runs are passed through, not counted."""
        if isinstance(client, ObservedClient):
            client = client.__wrapped__
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise ValueError(f"step must be a non-negative int or None, got {step!r}")
        with self._lock:
            self._generation += 1
            self._step = step
            self._sent = 0
            self._last_tag = None
            self._cut = []
            self._known = True
            run_id = getattr(client, "model_id", None)
            self._run_id = run_id if isinstance(run_id, str) else None
            if step is not None:  # restored: saves of the lost run after that checkpoint are never restored
                self._saves = [save for save in self._saves if save.step <= step]
                if all(save.step != step for save in self._saves):
                    self._saves.append(_Save(None, step, None))
                self.version += 1
                self._on_change()
            return ObservedClient(client, self, self._generation)

    def window(self, floor: int | None = None, ceiling: int | None = None) -> None:
        """The steps a resume may start at: at least ``floor`` (the oldest step the front-end can still train
        again, e.g. the oldest batch it kept) and at most ``ceiling``; None: unbounded. :meth:`step_of`
        refuses checkpoints outside, so the engine passes over them before any restore call."""
        for name, value in (("floor", floor), ("ceiling", ceiling)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
        if floor is not None and ceiling is not None and floor > ceiling:
            raise ValueError(f"floor {floor} is above ceiling {ceiling}")
        with self._lock:
            book = self.book  # built directly: dataclasses.replace costs more than the rest of a replayed step
            self.book = Book(saved=book.saved, split=book.split, floor=floor, ceiling=ceiling)

    # -- what it says ---------------------------------------------------------------------------------------
    @property
    def step(self) -> int | None:
        """The step a checkpoint saved now would hold (what a loop restored from it resumes at); None when the
        ledger cannot know (no step under way on a run it did not see start, or after a ``load_state``)."""
        if not self._known:
            return None
        if self._step is not None:
            return self._step
        return self._position()

    @property
    def sent(self) -> int:
        """``optim_step`` calls sent to the current run through the ledger's proxy (since it was adopted)."""
        return self._sent

    def keep_from(self, depth: int = 0) -> int | None:
        """The lowest step a front-end that replays must be able to train again, so that a recovery falling back
        past up to ``depth`` checkpoints saved (or restored) through this ledger resumes where it can: the step of
        the ``depth + 1``-th newest, or of the oldest if there are fewer; None before the first. Pass it to
        :meth:`window` as ``floor`` and the engine never restores an older one. The loop's thread."""
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be a non-negative int, got {depth!r}")
        split = self.book.split
        steps: list[int] = []  # distinct, newest first: a run's saves hold ever more steps (adopt drops the rest)
        with self._lock:
            for save in reversed(self._saves):  # newest first, and only as far as depth reaches: a front-end
                if save.path in split or not save.state():  # calls this whenever a save may have moved its floor
                    continue  # a failed save holds nothing; one not answered yet may still fail
                if not steps or save.step < steps[-1]:
                    steps.append(save.step)
                    if len(steps) > depth:
                        break
        if not steps:
            return None
        return steps[min(depth, len(steps) - 1)]

    def unanswered(self, newest: int = 2) -> bool:
        """Whether one of the ``newest`` saves was not answered yet (it may still fail: :meth:`keep_from` may move)."""
        if newest <= 0:
            return False
        with self._lock:
            saves = self._saves[-newest:]
        return any(save.state() is None for save in saves)

    def to_train_again(self, checkpoint_step: int, position: int | None = None) -> range:
        """The steps a loop at ``position`` (default: the step under way) trains again when it resumes at
        ``checkpoint_step``: from that step up to and including the step under way. What a front-end that keeps
        batches replays."""
        at = self._position() if position is None else position
        if at is None or at < checkpoint_step:
            return range(checkpoint_step, checkpoint_step)
        return range(checkpoint_step, at + 1)

    def step_of(self, checkpoint: Checkpoint) -> int | None:
        """Where a loop restored from ``checkpoint`` resumes, or None if it cannot resume from it (the engine
        then never restores it). The step the user recorded wins (user_metadata ``step``, else ``recorded``),
        then the one the ledger wrote (:data:`RESUME_KEY`), then the one it remembers for this run's saves.
        Refused: a checkpoint that cut a step in two, or whose step is outside the :meth:`window`. Any thread."""
        book = self.book  # one read: the snapshot this decision is taken against
        path = checkpoint.tinker_path
        step = checkpoint.step
        if step is None and self._recorded is not None:
            step = self._recorded(path)
        if step is None:
            if path in book.split:
                return None
            step = parse_step((checkpoint.user_metadata or {}).get(RESUME_KEY))
            if step is None:
                step = book.saved.get(path)
        if step is None:
            return None
        if (book.floor is not None and step < book.floor) or (book.ceiling is not None and step > book.ceiling):
            return None
        return step

    # -- what the proxy tells it (the loop's thread) ---------------------------------------------------------
    def _optim(self, generation: int) -> None:
        if generation != self._generation:
            return
        self._sent += 1
        tag = self._position()
        if tag is not None and tag == self._last_tag and self._cut:
            cut, self._cut = self._cut, []
            self.book = replace(self.book, split=frozenset([*self.book.split, *cut][-REMEMBERED:]))
            logger.warning(
                "checkpoint(s) %s were saved between two optim_steps of step %d: a loop restored from them could "
                "not train that step exactly once, so they are not resumed from; save after the step's last "
                "optim_step, or record its step (save_state(..., user_metadata={'step': ...}))",
                ", ".join(cut),
                tag,
            )
        if tag != self._last_tag:
            self._cut = []
        self._last_tag = tag
        if tag is not None:
            self._step = tag + 1
        elif self._step is not None:
            self._step += 1

    def _save(self, generation: int, name: str, *, remember: bool) -> _Save | None:
        """A save of ``name`` is being sent: what it holds (None if not known); the proxy gives it the save's
        future. ``remember``: the save cannot carry its step in its user_metadata, so the book keeps it by path."""
        if generation != self._generation:
            return None
        step = self.step
        if step is None:
            return None
        path = f"tinker://{self._run_id}/weights/{name}" if self._run_id is not None else None
        save = _Save(path, step)
        self._saves = [*self._saves[-REMEMBERED + 1 :], save]
        self.version += 1
        self._on_change()
        if path is None:
            return save
        if self._last_tag is not None and self._last_tag == self._position():
            self._cut.append(path)
        if remember:
            saved = {k: v for k, v in self.book.saved.items() if k != path}
            saved[path] = step
            self.book = replace(self.book, saved=MappingProxyType(dict(list(saved.items())[-REMEMBERED:])))
        return save

    def _loaded(self, generation: int) -> None:
        if generation == self._generation and self._known:
            self._known = False
            logger.warning(
                "load_state through the recovery layer's client: the steps its run holds are no longer known, so "
                "checkpoints saved after it need their step recorded (user_metadata {'step': ...}) to be resumed from"
            )


def _accepts_metadata(method: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return "user_metadata" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _like(method: Any, wrapper: Callable[..., Any]) -> Callable[..., Any]:
    """``wrapper`` dressed as the client's ``method``: its name and doc, and its signature (``__wrapped__``)."""
    wrapper.__wrapped__ = method  # type: ignore[attr-defined]
    wrapper.__name__ = getattr(method, "__name__", wrapper.__name__)
    wrapper.__qualname__ = getattr(method, "__qualname__", wrapper.__qualname__)
    wrapper.__doc__ = getattr(method, "__doc__", None)
    return wrapper


def _observe_optim(proxy: ObservedClient, method: Any) -> Callable[..., Any]:
    ledger, generation = proxy._ledger, proxy._generation

    def optim_step(*args: Any, **kwargs: Any) -> Any:
        with ledger._lock:  # the count follows the order the client sends in, whatever thread calls
            future = method(*args, **kwargs)  # one that raises before sending is not counted
            ledger._optim(generation)
        return future

    return _like(method, optim_step)


def _observe_optim_async(proxy: ObservedClient, method: Any) -> Callable[..., Any]:
    ledger, generation = proxy._ledger, proxy._generation

    async def optim_step_async(*args: Any, **kwargs: Any) -> Any:
        # Counted before the await: a coroutine that yields to the event loop before it sends must not let
        # another task's save be stamped without this step. (One that fails before sending fails the step.)
        with ledger._lock:
            ledger._optim(generation)
        return await method(*args, **kwargs)

    return _like(method, optim_step_async)


@contextmanager
def _sending(save: _Save | None) -> Iterator[None]:
    """Around a save's call: one that raises (or a coroutine cancelled) leaves nothing known to be saved."""
    try:
        yield
    except BaseException:
        if save is not None:
            save.future = _FAILED
        raise


def _sent(save: _Save | None, future: Any) -> None:
    if save is not None:
        save.future = future


def _observe_save(proxy: ObservedClient, method: Any) -> Callable[..., Any]:
    ledger = proxy._ledger

    def save_state(name: str, *args: Any, **kwargs: Any) -> Any:
        with ledger._lock:
            save, args = proxy._stamp(name, args, kwargs)
            with _sending(save):
                future = method(name, *args, **kwargs)
            _sent(save, future)
        return future

    return _like(method, save_state)


def _observe_save_async(proxy: ObservedClient, method: Any) -> Callable[..., Any]:
    ledger = proxy._ledger

    async def save_state_async(name: str, *args: Any, **kwargs: Any) -> Any:
        with ledger._lock:
            save, args = proxy._stamp(name, args, kwargs)
        with _sending(save):
            future = await method(name, *args, **kwargs)
        _sent(save, future)
        return future

    return _like(method, save_state_async)


def _observe_load(proxy: ObservedClient, method: Any) -> Callable[..., Any]:
    ledger, generation = proxy._ledger, proxy._generation

    def load_state(*args: Any, **kwargs: Any) -> Any:
        with ledger._lock:
            future = method(*args, **kwargs)
            ledger._loaded(generation)  # what the run holds is no longer counted
        return future

    return _like(method, load_state)


def _observe_load_async(proxy: ObservedClient, method: Any) -> Callable[..., Any]:
    ledger, generation = proxy._ledger, proxy._generation

    async def load_state_async(*args: Any, **kwargs: Any) -> Any:
        future = await method(*args, **kwargs)
        with ledger._lock:
            ledger._loaded(generation)
        return future

    return _like(method, load_state_async)


#: The client's methods the proxy observes, and how; every other attribute is the client's own, untouched.
OBSERVED: Mapping[str, Callable[[ObservedClient, Any], Callable[..., Any]]] = MappingProxyType(
    {
        "optim_step": _observe_optim,
        "optim_step_async": _observe_optim_async,
        "save_state": _observe_save,
        "save_state_async": _observe_save_async,
        "load_state": _observe_load,
        "load_state_with_optimizer": _observe_load,
        "load_state_async": _observe_load_async,
        "load_state_with_optimizer_async": _observe_load_async,
    }
)


class ObservedClient:
    """The training client, observed: ``optim_step`` and ``save_state`` (and their ``*_async`` forms) are
    counted by the :class:`Ledger` as they are sent, and each save carries its step in its user_metadata
    (:data:`RESUME_KEY`, under the user's own keys); ``load_state*`` makes the ledger stop claiming steps. Every
    other attribute is the client's own, untouched (the very same bound methods).

    It passes for the client: ``isinstance(proxy, type(client))`` holds (``__class__`` is the client's), an
    attribute exists on it exactly when it does on the client, and the observed methods carry the client's
    signature and docstring. ``type(proxy)`` is this class; ``proxy.__wrapped__`` is the client itself.
    """

    __slots__ = ("__wrapped__", "_generation", "_ledger", "_meta", "_wrappers")

    def __init__(self, client: Any, ledger: Ledger, generation: int) -> None:
        object.__setattr__(self, "__wrapped__", client)
        object.__setattr__(self, "_ledger", ledger)
        object.__setattr__(self, "_generation", generation)
        # name -> (the client's method, what the proxy hands out for it): built once, while the method stays the same
        object.__setattr__(self, "_wrappers", {})
        save = getattr(client, "save_state", None)
        object.__setattr__(self, "_meta", callable(save) and _accepts_metadata(save))

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance(proxy, TrainingClient), as the SDK's users check
        return type(self.__wrapped__)

    def __getattribute__(self, name: str) -> Any:
        # A public name (what the loop calls) is looked up here, not left to __getattr__ (the proxy's own failed
        # lookup first would cost more than observing the call), and a method's form is found without a call: a
        # loop pays this at every call, and inside a framework's loop each Python frame costs ~0.4 µs.
        get = object.__getattribute__
        if name[0] == "_":
            return get(self, name)  # the proxy's own; else __getattr__: the client's
        attr = getattr(get(self, "__wrapped__"), name)
        known = get(self, "_wrappers").get(name)
        if known is not None:  # the same method: the same object, or a bound method of the same function to the
            old = known[0]  # same client (a fresh one per read), by identity, never by the callable's __eq__
            if old is attr or (
                type(attr) is MethodType
                and type(old) is MethodType
                and old.__func__ is attr.__func__
                and old.__self__ is attr.__self__
            ):
                return known[1]
        if not callable(attr):
            return attr
        wrapped = get(self, "_wrap")(name, attr)
        get(self, "_wrappers")[name] = (attr, wrapped)
        return wrapped

    def _wrap(self, name: str, method: Any) -> Any:
        """What the proxy hands out for the client's ``method`` (built once while it stays the same): the method
        observed if the ledger observes ``name``, else the method itself."""
        observe = OBSERVED.get(name)
        return method if observe is None else observe(self, method)

    def __getattr__(self, name: str) -> Any:  # a private name the proxy has not
        return getattr(self.__wrapped__, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__wrapped__, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self.__wrapped__, name)

    def __dir__(self) -> list[str]:
        return dir(self.__wrapped__)

    def __repr__(self) -> str:
        return repr(self.__wrapped__)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.__wrapped__.__reduce_ex__(protocol)

    def _stamp(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[_Save | None, tuple[Any, ...]]:
        """Tell the ledger a save of ``name`` is being sent; put its step into the call's user_metadata (keyword
        or the SDK's positional place), under the user's own keys."""
        meta = self._meta
        save = self._ledger._save(self._generation, name, remember=not meta) if isinstance(name, str) else None
        if save is None or not meta:
            return save, args
        positional = len(args) >= 3 and "user_metadata" not in kwargs  # SDK order: ttl_seconds, overwrite, metadata
        given = args[2] if positional else kwargs.get("user_metadata")
        if given is not None and not isinstance(given, Mapping):
            return save, args  # the client's own error says what is wrong with it
        recorded = parse_step((given or {}).get(STEP_KEY))
        if recorded is not None and recorded != save.step:
            logger.warning(
                "checkpoint %s records step %d, but the steps sent before it make it %d; a loop restored from it "
                "resumes at %d (the step you record wins): check that the step you record is the next one to train",
                name,
                recorded,
                save.step,
                recorded,
            )
        stamped = {RESUME_KEY: str(save.step), **(given or {})}
        if positional:
            return save, (*args[:2], stamped, *args[3:])
        kwargs["user_metadata"] = stamped
        return save, args
