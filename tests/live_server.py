"""A real `lookalike serve` in its own process, for the tests that talk to one over a socket.

`running_server(home, ...)` starts the console entry point on a free port, waits until /health
answers, yields the base URL, and on exit stops the process (terminate, then kill). Its output
(stdout and stderr together) goes to a log file, never to a pipe nobody drains; when the server
dies before it is stopped, the log is part of the failure.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

import databases
from conftest import REPO, cli_command

HOST = "127.0.0.1"
PORT_ATTEMPTS = 5  # starts on a new port when the one picked was taken meanwhile


def free_port() -> int:
    """A TCP port nothing listens on at the moment (on the loopback interface)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _tail(path: Path, limit: int = 20_000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return text if len(text) <= limit else "…" + text[-limit:]


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_until_up(proc: subprocess.Popen, base: str, log: Path, timeout: float, retry_port: bool) -> bool:
    """True once /health answers; False when the server exited because its port was taken (and
    `retry_port`); an AssertionError when it exited otherwise or did not come up in `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            if retry_port and "address already in use" in _tail(log).lower():
                return False
            raise AssertionError(f"`lookalike serve` exited with {proc.returncode} on start:\n{_tail(log)}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"`lookalike serve` did not come up in {timeout:.0f} s:\n{_tail(log)}")
        time.sleep(0.2)


@contextmanager
def running_server(
    home: Path,
    *,
    model_cache: Path | None = None,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    host: str | None = HOST,
    log: Path | None = None,
    startup_timeout: float = 90,
    stop_timeout: float = 20,
) -> Iterator[str]:
    """`lookalike serve --host HOST --port PORT *extra_args` on `home`; yields `http://127.0.0.1:PORT`.

    `host=None` leaves `--host` out (the server's own default, loopback). Any host is reached
    through 127.0.0.1: the server listens there too when bound to 0.0.0.0.

    The environment is `databases.process_env`: this process's without its LOOKALIKE_ settings,
    plus the home and its test database, LOOKALIKE_MODEL_CACHE (when given) and then `env`.
    `log` receives the server's output (kept for the caller to read afterwards); without it a
    temporary file does, removed on exit.
    """
    own_log = log is None
    if own_log:
        fd, name = tempfile.mkstemp(prefix="lookalike-serve-", suffix=".log")
        os.close(fd)
        log = Path(name)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
    proc = None
    try:
        # free_port() only says the port was free a moment ago: another process (a concurrent test
        # run, an outgoing connection) may take it before the server binds it. Then the server
        # exits saying so, and it is started again on another port.
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = free_port()
            command = cli_command("serve", *(("--host", host) if host else ()), "--port", str(port), *extra_args)
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    command,
                    env=databases.process_env(home, model_cache, **(env or {})),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                )
            base = f"http://{HOST}:{port}"
            if _wait_until_up(proc, base, log, startup_timeout, retry_port=attempt < PORT_ATTEMPTS):
                break
        try:
            yield base
        except BaseException as exc:
            if proc.poll() is not None:
                exc.add_note(f"`lookalike serve` had exited with {proc.returncode}:\n{_tail(log)}")
            raise
        if proc.poll() is not None:
            raise AssertionError(f"`lookalike serve` exited with {proc.returncode} while in use:\n{_tail(log)}")
    finally:
        if proc is not None:
            _stop(proc, stop_timeout)
        if own_log:
            log.unlink(missing_ok=True)
