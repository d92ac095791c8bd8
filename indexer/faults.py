"""Fault injection for crash tests: `checkpoint(name)` marks a moment a run may be killed at.

A testing hook only. Unless the environment variable LOOKALIKE_FAULTS is set when this module is
first imported, `checkpoint` is a function that does nothing. When set, it is a comma-separated
list of `NAME:N=ACTION`: the Nth time this process reaches checkpoint NAME, ACTION happens:

    kill     SIGKILL this very process (no cleanup, no atexit, no flush)
    enospc   raise OSError(ENOSPC) ("No space left on device")
    eacces   raise PermissionError(EACCES)
    stop     SIGSTOP this very process; it carries on when sent SIGCONT (a test holds a run still)

e.g. LOOKALIKE_FAULTS="commit:3=kill,index-write:1=enospc". Checkpoints in the code:
decode, embed, commit, committed, index-write, manifest-write, head-save, tag, reindex,
import-batch, import-commit, import-committed, ann-build, compaction, ann-swap, duplicates-commit.

LOOKALIKE_FAULTS_TRACE=FILE appends the name of every checkpoint reached to FILE, one a line,
so a test can count how often each is reached in an uninterrupted run and aim its faults.
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

ENV = "LOOKALIKE_FAULTS"
TRACE_ENV = "LOOKALIKE_FAULTS_TRACE"
ACTIONS = ("kill", "enospc", "eacces", "stop")


def _parse(spec: str) -> dict[str, dict[int, str]]:
    plan: dict[str, dict[int, str]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            where, action = item.split("=", 1)
            name, count = where.rsplit(":", 1)
            hit = int(count)
        except ValueError:
            raise ValueError(f"{ENV}: {item!r} is not NAME:N=ACTION") from None
        action = action.strip().lower()
        if action not in ACTIONS or hit < 1:
            raise ValueError(f"{ENV}: {item!r}: ACTION must be one of {', '.join(ACTIONS)} and N >= 1")
        plan.setdefault(name.strip(), {})[hit] = action
    return plan


def _fire(action: str, path: object) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    filename = None if path is None else str(path)
    if action == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device (injected)", filename)
    raise PermissionError(errno.EACCES, "Permission denied (injected)", filename)


def _noop(name: str, path: object = None) -> None:
    pass


_PLAN = _parse(os.environ.get(ENV, ""))
_TRACE = os.environ.get(TRACE_ENV, "")
_hits: Counter[str] = Counter()


def _armed(name: str, path: object = None) -> None:
    """Reached checkpoint `name` (writing `path`, if any: an injected OSError names it)."""
    if _TRACE:
        fd = os.open(_TRACE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{name}\n".encode())
        finally:
            os.close(fd)
    _hits[name] += 1
    action = _PLAN.get(name, {}).get(_hits[name])
    if action:
        _fire(action, path)


checkpoint = _armed if (_PLAN or _TRACE) else _noop
