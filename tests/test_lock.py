"""requirements.lock (tools/lock.py) against pyproject.toml on any host, and against the running
venv where make installed that venv from the lock (CPython 3.12 on Linux x86-64, as in CI)."""

import importlib.util
import os
import sys

import pytest
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("lock", os.path.join(ROOT, "tools", "lock.py"))
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)


def test_lock_is_what_the_tool_writes():
    """One `name==version` per PEP 503 name (read() refuses a name pinned twice), sorted, under
    the header, with nothing from UNPINNED."""
    pins = lock.read()
    with open(lock.LOCK) as f:
        assert f.read() == lock.render(pins)
    assert not pins.keys() & lock.UNPINNED


def test_lock_pins_every_requirement_of_pyproject():
    """Each dependency and dev / tpu / seqio extra requirement whose markers hold on the target is
    pinned to a version its specifier accepts."""
    pins = lock.read()
    wrong = []
    for req in lock.root_requirements(markers=lock.TARGET_MARKERS):
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None or not req.specifier.contains(pinned, prereleases=True):
            wrong.append(f"{req}: requirements.lock has {pinned}")
    assert not wrong, "; ".join(wrong) + " (install it in .venv, then make lock)"


def test_read_refuses_a_name_pinned_twice(tmp_path):
    path = tmp_path / "requirements.lock"
    path.write_text("# header\nml-collections==1.0\nML_Collections==1.1\n")
    with pytest.raises(SystemExit, match=r"requirements.lock:3: expected one"):
        lock.read(str(path))


def test_differences_names_each_disagreement():
    locked = {"a": "1", "b": "2", "c": "3"}
    installed = {"a": "1", "b": "2.1", "d": "4"}
    assert lock.differences(locked, installed) == [
        "b: locked 2, installed 2.1",
        "c: locked 3, installed (not needed)",
        "d: locked (not locked), installed 4",
    ]


def test_venv_holds_exactly_the_lock():
    """The closure of tessera[dev,tpu] in this venv is the lock, name for name and version for
    version: a lock that misses a dependency (pip then picks its newest version) or pins one
    that is no longer needed fails here. Only where make installed the venv from the lock."""
    if lock.here() != lock.TARGET:
        pytest.skip(f"requirements.lock is for {lock.TARGET}; this interpreter is {lock.here()}")
    if not os.path.exists(os.path.join(sys.prefix, "requirements.lock")):
        pytest.skip(f"{sys.prefix} was not installed from requirements.lock (make install does)")
    assert lock.differences(lock.read(), lock.closure(lock.root_requirements())) == []
