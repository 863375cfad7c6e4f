"""The key is masked wherever our records are formatted, tracebacks included, whatever another library does to
logging's record factory; loggers that are not ours are not touched."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest

from tinkex_recovery import RecoveryPolicy, recovery_guard
from tinkex_recovery._redact import register_secret
from tinkex_recovery.simulated import SimulatedTinker

from .helpers import WAIT
from .test_rest import debug_everywhere, leaks, log_lines

SECRET = f"tml-REDACT-{uuid.uuid4().hex}"
POLICY = RecoveryPolicy(enabled=True, poll_interval=3600, backoff=0, max_backoff=0, attempt_timeout=WAIT)


@pytest.fixture
def secret() -> str:
    """Registered as TinkerRest registers its key: once the HTTP stack (and so its loggers) is imported."""
    import httpx  # noqa: F401
    import tinker  # noqa: F401

    register_secret(SECRET)
    return SECRET


@pytest.fixture
def foreign_factory() -> Iterator[None]:
    """Another library replaces the record factory with its own, which knows nothing of ours."""
    before = logging.getLogRecordFactory()
    logging.setLogRecordFactory(logging.LogRecord)
    yield
    logging.setLogRecordFactory(before)


@pytest.mark.parametrize("name", ["tinkex_recovery", "tinkex_recovery.rest", "httpx", "httpcore.http11", "tinker"])
def test_our_records_are_masked_message_and_traceback_even_after_the_factory_changed(
    secret: str, foreign_factory: None, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    debug_everywhere(caplog)
    logger = logging.getLogger(name)
    try:
        raise RuntimeError(f"the server said: bad key {secret}")
    except RuntimeError:
        logger.warning("request with %s failed", secret, exc_info=True, stack_info=True)
    (record,) = [r for r in caplog.records if r.name == name]
    (line,) = log_lines([record])
    assert "***" in line and "RuntimeError: the server said: bad key ***" in line
    assert not leaks(secret, [line, caplog.text])


def test_a_record_without_a_secret_keeps_its_traceback_object(secret: str, caplog: pytest.LogCaptureFixture) -> None:
    try:
        raise ValueError("nothing to hide")
    except ValueError:
        logging.getLogger("tinkex_recovery").error("failed", exc_info=True)
    (record,) = caplog.records
    assert record.exc_info is not None and record.exc_info[0] is ValueError


def test_loggers_that_are_not_ours_get_no_filter(secret: str) -> None:
    for name in ("app", "app.training", "tinkerer", "httpx_extra"):
        assert logging.getLogger(name).filters == []
    assert logging.getLogger("tinkex_recovery").filters and logging.getLogger("httpcore.http11").filters


def test_the_guards_step_failed_warning_masks_the_key_its_traceback_carries(
    secret: str, foreign_factory: None, caplog: pytest.LogCaptureFixture
) -> None:
    """The SDK's error for a lost run may echo the key (a careless server): the guard logs that error, with its
    traceback, as it recovers."""
    caplog.set_level(logging.DEBUG, logger="tinkex_recovery")  # the step's traceback is logged at DEBUG
    sim = SimulatedTinker()
    client = sim.create_lora_training_client(base_model="m")
    client.save_state("one", user_metadata={"step": "1"}).result()
    with recovery_guard(client.model_id, sim, policy=POLICY, client=client) as guard:
        for step in guard.steps(range(1, 3)):
            with step:
                if guard.run_id == client.model_id:
                    sim.corrupt(client.model_id)
                    raise RuntimeError(f"request failed: 400 {{'detail': 'bad key', 'api_key': '{secret}'}}")
    assert len(guard.recoveries) == 1
    (lost,) = [r for r in caplog.records if "recovering" in r.getMessage() and "which was lost" in r.getMessage()]
    assert "'api_key': '***'" in log_lines([lost])[0]  # the one-line INFO names the error, masked
    (warning,) = [r for r in caplog.records if "the error of step" in r.getMessage()]
    (line,) = log_lines([warning])
    assert "Traceback" in line and "'api_key': '***'" in line
    assert not leaks(secret, log_lines(caplog.records))
