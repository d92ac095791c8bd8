"""The fault-injection hook itself: parsing, counting, the three actions, and nothing when unset;
and the harness's report of a command that outlives its timeout."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from faultlib import REPO, base_env, run_cli

from live_server import free_port

PROBE = """
import errno
from indexer import faults
print(faults.checkpoint is faults._noop)
for n in range(1, 4):
    for name, path in (("a", "/some/file"), ("b", None)):
        try:
            faults.checkpoint(name, path)
        except OSError as exc:
            print(n, name, type(exc).__name__, errno.errorcode[exc.errno], exc.filename, exc.strerror)
print("done")
"""


def _probe(spec: str | None, trace: str | None = None) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    if spec is not None:
        env["LOOKALIKE_FAULTS"] = spec
    if trace is not None:
        env["LOOKALIKE_FAULTS_TRACE"] = trace
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)


def test_unset_is_a_no_op():
    proc = _probe(None)
    assert proc.returncode == 0 and proc.stdout.split() == ["True", "done"], proc.stderr


def test_errors_fire_at_the_named_hit_only():
    proc = _probe("a:2=enospc, b:3=eacces")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "False",
        "2 a OSError ENOSPC /some/file No space left on device (injected)",
        "3 b PermissionError EACCES None Permission denied (injected)",
        "done",
    ]


def test_kill_is_a_real_sigkill(tmp_path):
    trace = tmp_path / "trace"
    proc = _probe("b:2=kill", str(trace))
    assert proc.returncode == -signal.SIGKILL and proc.stdout.split() == ["False"]
    assert trace.read_text().split() == ["a", "b", "a", "b"]  # the trace counts up to the kill


def test_a_malformed_spec_is_refused():
    for spec in ("a=kill", "a:0=kill", "a:x=kill", "a:1=explode"):
        proc = _probe(spec)
        assert proc.returncode == 1 and "LOOKALIKE_FAULTS" in proc.stderr, (spec, proc.stderr)


def test_a_command_that_outlives_its_timeout_is_reported_with_its_threads_stacks(tmp_path, model_cache):
    """A hang in a kill trial is caught by its timeout; the report says where each thread was
    (SIGUSR1 to the group: cli.main registers faulthandler), so one failure is enough to fix it."""
    env = base_env(tmp_path / "home", model_cache)
    with pytest.raises(AssertionError) as failed:
        run_cli(["serve", "--port", str(free_port())], env, timeout=8)
    message = str(failed.value)
    assert "timed out after 8 s" in message, message
    assert "most recent call first" in message and "cli.py" in message, message
