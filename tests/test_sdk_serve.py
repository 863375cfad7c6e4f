"""``python -m tinkex_recovery.simulated`` and ``tinkex-recovery serve``: started as a user would, in another
process; the printed exports are all the real SDK needs, a run is corrupted with the printed curl recipe's
endpoint, and Ctrl-C (or SIGTERM) stops the server cleanly."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tinker

from .sdk_support import ADAM, BASE_MODEL, datum, stop_sdk_threads

pytestmark = pytest.mark.sdk

KEY = "tml-SERVE-CLI-KEY-4e1f0a9c"
EXPORT = re.compile(r"^\s*export (TINKER_\w+)=(\S+)$")
COMMANDS = {
    "module": [sys.executable, "-m", "tinkex_recovery.simulated"],
    "script": [str(Path(sys.executable).parent / "tinkex-recovery"), "serve"],
}


@pytest.fixture(params=sorted(COMMANDS))
def served(request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen[str], dict[str, str], str]]:
    """The server process, the variables it told us to export, and all it printed on starting."""
    proc = subprocess.Popen(
        [*COMMANDS[request.param], "--api-key", KEY],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        exports: dict[str, str] = {}
        banner: list[str] = []
        assert proc.stdout is not None
        while not banner or "/_sim/lineage/" not in banner[-1]:  # the banner's last line
            banner.append(proc.stdout.readline())
            assert banner[-1], f"the server exited while starting: {proc.communicate(timeout=10)}"
            if m := EXPORT.match(banner[-1]):
                exports[m.group(1)] = m.group(2)
        yield proc, exports, "".join(banner)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def stop(proc: subprocess.Popen[str], signum: int) -> str:
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    return out


def test_the_printed_exports_point_the_sdk_at_the_server_and_a_run_can_be_corrupted_from_outside(
    served: tuple[subprocess.Popen[str], dict[str, str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    proc, exports, banner = served
    assert set(exports) == {"TINKER_BASE_URL", "TINKER_API_KEY", "TINKER_TELEMETRY"}
    assert exports["TINKER_API_KEY"] == KEY and exports["TINKER_BASE_URL"].startswith("http://127.0.0.1:")
    for name, value in exports.items():
        monkeypatch.setenv(name, value)
    url = exports["TINKER_BASE_URL"]
    try:
        with tinker.ServiceClient() as service:  # configured by the environment alone
            client = service.create_lora_training_client(base_model=BASE_MODEL).result()
            for i in range(3):
                client.forward_backward([datum(i)], "cross_entropy").result()
                client.optim_step(ADAM).result()
            path = client.save_state("three", user_metadata={"step": "3"}).result().path
            with httpx.Client(base_url=url, headers={"X-API-Key": KEY}) as admin:
                assert client.model_id in admin.get("/_sim/runs").json()["runs"]
                assert admin.get(f"/_sim/lineage/{client.model_id}").json()["lineage"] == [[0], [1], [2]]
                assert admin.post(f"/_sim/corrupt/{client.model_id}").status_code == 200
            with pytest.raises(tinker.RequestFailedError, match="corrupted"):
                client.forward_backward([datum(3)], "cross_entropy").result()
            restored = service.create_training_client_from_state_with_optimizer(path).result()
            assert restored.model_id != client.model_id
    finally:
        assert stop_sdk_threads()
    assert stop(proc, signal.SIGINT if proc.args[1] == "-m" else signal.SIGTERM).strip() == "stopped"
    assert 'curl -s -X POST -H "X-API-Key: $TINKER_API_KEY" $TINKER_BASE_URL/_sim/corrupt/RUN_ID' in banner


def test_a_key_the_sdk_would_not_send_is_refused_at_once() -> None:
    for command in COMMANDS.values():
        out = subprocess.run(
            [*command, "--api-key", "sk-not-tinker"], capture_output=True, text=True, timeout=30, check=False
        )
        assert out.returncode == 2 and "--api-key must start with 'tml-'" in out.stderr
