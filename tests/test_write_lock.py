"""The home's write lock: one writer at a time, the background maintainer waited for, and the
moments when a busy lock names no live holder (just taken, or left by a killed holder)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

import databases
from indexer import library as library_module
from indexer.errors import IndexBusy
from indexer.library import MAINTAINER_MARK, Library


@pytest.fixture
def library(tmp_path):
    opened = Library(databases.home_settings(tmp_path / "home"))
    yield opened
    opened.close()


@contextmanager
def held_lock(library: Library, content: str = ""):
    """The write lock taken through a descriptor of its own (as another process would), naming
    `content` as its holder."""
    fd = os.open(library.home / "write.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, content.encode(), 0)
        yield fd
    finally:
        os.close(fd)


def a_dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_named_writer_is_refused_at_once_and_the_name_is_cleared_on_release(library):
    with held_lock(library, str(os.getpid())):
        with pytest.raises(IndexBusy, match=f"being written by pid {os.getpid()}; try again"):
            with library.write_lock():
                pass
    with library.write_lock():
        assert (library.home / "write.lock").read_text() == str(os.getpid())
    # Released: a stale name could be read by the next writer before its holder renames it.
    assert (library.home / "write.lock").read_text() == ""


def test_an_unnamed_holder_is_waited_for_briefly_then_refused(library, monkeypatch):
    monkeypatch.setattr(library_module, "UNNAMED_HOLD", 0.3)
    for content in ["", str(a_dead_pid()), "garbage"]:
        with held_lock(library, content):
            with pytest.raises(IndexBusy, match="being written by pid another process; try again"):
                with library.write_lock():
                    pass


def test_a_holder_that_has_not_named_itself_yet_is_waited_for(library, monkeypatch):
    # The race CI hit: the maintainer had taken the lock but not yet written its mark, and a
    # writer that read the empty file was refused instead of waiting for the maintainer.
    monkeypatch.setattr(library_module, "UNNAMED_HOLD", 120.0)  # a loaded machine may be slow to name
    seen_unnamed = threading.Event()
    read_holder = library_module._lock_holder

    def spy(fd):
        holder = read_holder(fd)
        if holder[0] is None:
            seen_unnamed.set()
        return holder

    monkeypatch.setattr(library_module, "_lock_holder", spy)
    outcome = {}

    def writer():
        try:
            with library.write_lock():
                outcome["got"] = True
        except IndexBusy as error:
            outcome["refused"] = str(error)

    thread = threading.Thread(target=writer)
    with held_lock(library) as fd:
        thread.start()
        assert seen_unnamed.wait(120), outcome
        os.pwrite(fd, f"{os.getpid()}{MAINTAINER_MARK}".encode(), 0)
        time.sleep(0.3)  # the writer now waits for the maintainer (any length of pause will do)
    thread.join(120)
    assert outcome == {"got": True}
