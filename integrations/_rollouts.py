"""Which rollouts an RL loop may still train on after a recovery: the weights a sampler was made from, and how far
behind the weights under training they are.

After a recovery the loop resumes at the restored checkpoint's step ``k`` on a new run. The weights a lost run held
at a step ``s <= k`` are the new run's weights at ``s`` too (the checkpoint holds that history), so a rollout
sampled from them is as good as ever, ``at - s`` steps stale. Weights at ``s > k`` are from the lost run's future:
the new run trains steps ``k..s-1`` again on other data and never holds them, so their rollouts are off the
lineage, whatever their staleness says. Over several recoveries, a version is on the lineage when no recovery
after it resumed below its step. The guard keeps the recoveries; the loop keeps its rollouts, tagged with the
:class:`WeightsVersion` its sampler was published with, and asks :meth:`RecoveryGuard.staleness`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["WeightsVersion", "staleness"]


@dataclass(frozen=True, slots=True)
class WeightsVersion:
    """The weights a sampler was made from, as a guarded loop counts them (:meth:`RecoveryGuard.weights_version`)."""

    step: int  #: the step index the weights hold (what a checkpoint saved with them would resume at)
    run_id: str  #: the run they were saved from
    generation: int  #: how many recoveries the loop had gone through then (the run's place in the lineage)


class _Resumed(Protocol):
    @property
    def resumed_at(self) -> int: ...

    @property
    def new_run_id(self) -> str: ...


def staleness(version: WeightsVersion, at: int, recoveries: Sequence[_Resumed], origin: str) -> int | None:
    """Steps from ``version`` to step ``at`` of the lineage that went through ``recoveries`` (its first run:
    ``origin``), or None when ``version``'s weights are not in that lineage's history at ``at`` (from a lost run's
    future, or ahead of ``at``). A version of another lineage is refused (``ValueError``)."""
    g = version.generation
    if not 0 <= g <= len(recoveries) or version.run_id != (recoveries[g - 1].new_run_id if g else origin):
        raise ValueError(f"{version!r} is not a version of this guard's lineage")
    if version.step > at or any(r.resumed_at < version.step for r in recoveries[g:]):
        return None
    return at - version.step
