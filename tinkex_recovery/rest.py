"""Tinker's REST API over httpx, as the engine reads it: :class:`TinkerRest`.

``RecoveryEngine(policy, status=TinkerRest())`` polls runs with bounded, predictable calls instead of the
official SDK's ``RestClient`` (whose calls may retry for minutes).
"""

from ._rest import DEFAULT_BASE_URL, TinkerRest

__all__ = ["DEFAULT_BASE_URL", "TinkerRest"]
