"""The command line as a script uses it, in real processes (the installed console script) against the loopback
server: a reader that leaves (``| head -1``, a closed pipe) ends ``watch`` and ``status`` quietly with 141;
``--json`` is strict JSON; a bad run id is refused before any request, echoed escaped; ``--help`` loads neither
httpx nor pydantic and states the exit codes; a step-less checkpoint is marked; ``serve`` on a busy port is one
line; a missing key names ``--api-key``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tinkex_recovery.simulated import SimulatedServer, SimulatedTinker, serve

from .helpers import WAIT, run_with_checkpoints
from .http_support import KEY

SCRIPT = str(Path(sys.executable).parent / "tinkex-recovery")
CLOSED_PIPE = 141


@pytest.fixture
def server(sim: SimulatedTinker) -> Iterator[SimulatedServer]:
    with serve(sim, KEY) as server:
        server.keep_alive = False
        yield server


def environ(server: SimulatedServer | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINKER_")}
    if server is not None:
        env |= {"TINKER_BASE_URL": server.base_url, "TINKER_API_KEY": KEY}
    return env


def run(*args: str, server: SimulatedServer | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environ(server),
        stdin=subprocess.DEVNULL,
    )


def with_closed_stdout(*args: str, server: SimulatedServer) -> tuple[int, str]:
    """Run with stdout a pipe whose reader has already left: every write to it fails (EPIPE)."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [SCRIPT, *args],
            stdout=write,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=60,
            check=False,
            env=environ(server),
        )
    finally:
        os.close(write)
    return proc.returncode, proc.stderr


BASH = shutil.which("bash")


def pipeline(command: str, server: SimulatedServer) -> tuple[str, list[int], str]:
    """``command`` (a shell pipeline) in bash; its output, each member's exit status, and its stderr."""
    assert BASH is not None
    done = subprocess.run(
        [BASH, "-c", f'{command}; echo "${{PIPESTATUS[@]}}" >&2'],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environ(server) | {"TINKEX": SCRIPT},
        stdin=subprocess.DEVNULL,
    )
    *err, codes = done.stderr.splitlines()
    return done.stdout, [int(c) for c in codes.split()], "\n".join(err)


# -- closed pipes ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(BASH is None, reason="needs bash for PIPESTATUS")
def test_watch_json_piped_into_head_1_ends_after_its_line_with_141(
    sim: SimulatedTinker, server: SimulatedServer
) -> None:
    lost = run_with_checkpoints(sim)
    sim.corrupt(lost.model_id)  # the first poll reports it; then no event comes to find the closed pipe out
    out, codes, err = pipeline(f'"$TINKEX" watch {lost.model_id} --json --interval 3600 | head -1', server)
    (line,) = out.splitlines()
    assert json.loads(line)["kind"] == "detected"
    assert codes == [CLOSED_PIPE, 0]
    assert "Traceback" not in err and "BrokenPipe" not in err


@pytest.mark.skipif(BASH is None, reason="needs bash for PIPESTATUS")
def test_grep_m1_detected_and_alert_goes_on(sim: SimulatedTinker, server: SimulatedServer) -> None:
    healthy, lost = run_with_checkpoints(sim), run_with_checkpoints(sim)
    sim.corrupt(lost.model_id)
    command = f'"$TINKEX" watch {healthy.model_id} {lost.model_id} --json | grep -m1 detected'
    out, codes, err = pipeline(command, server)
    assert lost.model_id in out and len(out.splitlines()) == 1
    assert codes == [CLOSED_PIPE, 0] and "Traceback" not in err  # grep's 0: `... && alert` goes on


def test_watch_whose_reader_left_before_any_event_ends_too(sim: SimulatedTinker, server: SimulatedServer) -> None:
    healthy = run_with_checkpoints(sim)  # nothing to print: only the pipe's state can say the reader left
    code, err = with_closed_stdout("watch", healthy.model_id, "--interval", "3600", server=server)
    assert code == CLOSED_PIPE and "Traceback" not in err and "stopped" not in err


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
def test_status_into_a_closed_pipe_is_quiet_with_141(
    sim: SimulatedTinker, server: SimulatedServer, json_flag: list[str]
) -> None:
    run_id = run_with_checkpoints(sim).model_id
    code, err = with_closed_stdout("status", run_id, *json_flag, server=server)
    assert (code, err) == (CLOSED_PIPE, "")


@pytest.mark.skipif(BASH is None, reason="needs bash for PIPESTATUS")
def test_status_piped_into_head_1(sim: SimulatedTinker, server: SimulatedServer) -> None:
    run_id = run_with_checkpoints(sim).model_id
    out, codes, err = pipeline(f'"$TINKEX" status {run_id} | head -1', server)
    assert out.startswith("Lineage of run") and len(out.splitlines()) == 1
    assert codes[0] in (0, CLOSED_PIPE) and err == ""  # 0 when it all fit in the pipe before head left


# -- strict JSON ----------------------------------------------------------------------------------------------
def _strict(text: str) -> object:
    def refuse(constant: str) -> object:
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_status_json_has_no_nan_or_infinity_and_marks_stepless_checkpoints(
    sim: SimulatedTinker, server: SimulatedServer
) -> None:
    client = run_with_checkpoints(sim)
    client.save_state("odd", user_metadata={"step": "6", "loss": "nan", "big": "1e400", "small": "-1e400"}).result()
    client.save_state("bare").result()  # no step: Tinker restores it, a guarded loop cannot resume from it
    done = run("status", client.model_id, "--json", server=server)
    assert done.returncode == 0, done.stderr
    report = _strict(done.stdout)
    assert isinstance(report, dict)
    by_id = {c["checkpoint_id"]: c for c in report["checkpoints"]}
    assert by_id["weights/odd"]["metrics"] == {"loss": "nan", "big": "inf", "small": "-inf"}
    assert by_id["weights/odd"]["resumable"] is True and by_id["weights/0004"]["metrics"] == {"loss": 0.25}
    assert (by_id["weights/bare"]["step"], by_id["weights/bare"]["resumable"]) == (None, False)
    text = run("status", client.model_id, server=server).stdout
    (bare,) = [line for line in text.splitlines() if line.rstrip().endswith("/weights/bare")]
    assert bare.split()[0] == "?" and "? no step recorded" in text and "cannot resume from it" in text


def test_watch_marks_the_stepless_checkpoint_it_would_restore(sim: SimulatedTinker, server: SimulatedServer) -> None:
    client = run_with_checkpoints(sim)
    client.save_state("bare").result()  # the newest, and no step
    sim.corrupt(client.model_id)
    for flag in ("--json", ""):
        out, codes, _ = pipeline(f'"$TINKEX" watch {client.model_id} {flag} | grep -m1 checkpoint_selected', server)
        assert codes == [CLOSED_PIPE, 0] and "/weights/bare" in out
        if flag:
            assert json.loads(out)["resumable"] is False
        else:
            assert "no step recorded: a guarded loop or the Lightning callback cannot resume from it" in out


# -- run ids --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run_id", [".", "..", "\x1b[31mred", "run\x00id", "a\u202eb"])
@pytest.mark.parametrize("command", ["status", "watch"])
def test_a_bad_run_id_is_refused_before_any_request_and_echoed_escaped(
    server: SimulatedServer, command: str, run_id: str
) -> None:
    if "\x00" in run_id:  # an argv cannot hold NUL: what a script could pass is the rest
        run_id = run_id.replace("\x00", "\x07")
    done = run(command, run_id, server=server)
    assert done.returncode == 2 and done.stdout == ""
    assert server.requests == ()  # nothing asked: `status .` read the account's listing
    assert repr(run_id) in done.stderr and "invalid run id" in done.stderr
    assert all(c.isprintable() for c in done.stderr.replace("\n", "")), "a control character reached the terminal"
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("interval", ["inf", "nan", "1e-300", "1e12", "0"])
def test_an_interval_that_cannot_work_is_a_usage_error(server: SimulatedServer, interval: str) -> None:
    done = run("watch", "run:train:0", "--interval", interval, server=server)
    assert done.returncode == 2 and "between 0.01 and 86400 seconds" in done.stderr and "Traceback" not in done.stderr
    assert server.requests == ()


# -- help -----------------------------------------------------------------------------------------------------
HEAVY = ("httpx", "pydantic", "tinkex_recovery._engine", "tinkex_recovery.simulated._server", "tinker")


@pytest.mark.parametrize("argv", [["--help"], ["status", "--help"], ["watch", "--help"], ["serve", "--help"]])
def test_help_loads_nothing_heavy_and_states_the_exit_status(argv: list[str]) -> None:
    code = (
        "import sys, contextlib, io\n"
        "from tinkex_recovery.__main__ import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        f"    main({argv!r})\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "print(out.getvalue())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded, _, help_text = done.stdout.partition("\n")
    assert loaded == "[]", f"--help imported {loaded}"
    assert "Exit status:" in help_text
    if argv[0] != "--help":
        assert "--" in help_text.split("options:")[1]  # the command's own options are there
    if argv[0] in ("status", "watch"):
        assert "141" in help_text and "--api-key" in help_text


# -- one-line errors ------------------------------------------------------------------------------------------
def test_no_key_names_the_flag(sim: SimulatedTinker, server: SimulatedServer) -> None:
    env = environ(server) | {"TINKER_API_KEY": ""}
    run_id = run_with_checkpoints(sim).model_id
    done = subprocess.run([SCRIPT, "status", run_id], capture_output=True, text=True, timeout=60, env=env, check=False)
    assert done.returncode == 2 and "--api-key" in done.stderr and "api_key=" not in done.stderr


def test_a_malformed_base_url_names_the_flag(server: SimulatedServer) -> None:
    done = run("status", "run:train:0", "--base-url", "ftp://x", server=server)
    assert done.returncode == 2 and "--base-url (or TINKER_BASE_URL) must be an http(s) URL" in done.stderr


def test_a_wrong_base_url_path_names_the_url(sim: SimulatedTinker, server: SimulatedServer) -> None:
    run_id = run_with_checkpoints(sim).model_id
    wrong = f"{server.base_url}/services/tinker-prod"
    done = run("status", run_id, "--base-url", wrong, server=server)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert f"{wrong}/api/v1/training_runs/{run_id}" in done.stderr and "HTTP 404" in done.stderr


def test_serve_on_a_busy_port_is_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [SCRIPT, "serve", "--port", str(port)], capture_output=True, text=True, timeout=WAIT * 6, check=False
        )
    assert done.returncode == 1 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line
