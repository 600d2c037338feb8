"""requirements.lock: the exact versions `make install` puts in .venv, from a tested venv.

The lock pins the dependency closure of tessera[dev,tpu,seqio]: pyproject.toml's dependencies
and its dev, tpu and seqio extras, then what each of those requires (with the extras asked for),
walked through the installed distributions' metadata with environment markers evaluated for the
running interpreter. It is written for one target, CPython 3.12 on Linux x86-64 (the CI
machine); make installs unpinned elsewhere. tessera itself is not pinned (make installs it
editable, --no-deps), nor are pip, setuptools and wheel (make upgrades pip before it installs
anything).

Run with the venv's python, from the repository root (make lock does):

  .venv/bin/python tools/lock.py           rewrite requirements.lock from what .venv holds
  .venv/bin/python tools/lock.py --check   exit 1, listing the differences, if they disagree

tests/test_lock.py checks the lock against pyproject.toml everywhere, and against the running
venv where make installed it from the lock.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tomllib
from collections.abc import Iterable, Mapping
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(ROOT, "pyproject.toml")
LOCK = os.path.join(ROOT, "requirements.lock")
EXTRAS = ("dev", "tpu", "seqio")
# The Makefile compares the same two strings (LOCK_TARGET) to pick the locked install.
TARGET = "cpython-312 linux-x86_64"
# The marker environment of TARGET, for reading pyproject.toml's requirements on any host.
TARGET_MARKERS = {
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "python_version": "3.12",
    "python_full_version": "3.12.0",
    "implementation_version": "3.12.0",
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
}
UNPINNED = frozenset({"tessera", "pip", "setuptools", "wheel"})
HEADER = """\
# Exact versions of tessera[dev,tpu,seqio] and everything it needs (the closure of
# pyproject.toml's dependencies and its dev, tpu and seqio extras), as tested by make test on
# CPython 3.12, Linux x86-64.
# make install uses it there (pip install -r requirements.lock, then tessera with --no-deps)
# and installs unpinned elsewhere. tessera, pip, setuptools and wheel are not pinned.
# Regenerate from a venv that passes make test: make lock (python tools/lock.py);
# to move to newer versions first: .venv/bin/pip install --upgrade -e ".[dev,tpu,seqio]".
"""


def here() -> str:
    """The running interpreter and platform, in TARGET's terms."""
    return f"{sys.implementation.cache_tag} {sysconfig.get_platform()}"


def root_requirements(
    pyproject: str = PYPROJECT, markers: Mapping[str, str] | None = None
) -> list[Requirement]:
    """pyproject.toml's dependencies plus the EXTRAS, those whose markers hold for `markers`
    (default: the running interpreter)."""
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    lines = project["dependencies"] + [
        line for extra in EXTRAS for line in project["optional-dependencies"][extra]
    ]
    environment = {**(markers or {}), "extra": ""}
    reqs = [Requirement(line) for line in lines]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(environment)]


def closure(requirements: Iterable[Requirement]) -> dict[str, str]:
    """PEP 503 name -> installed version of every distribution `requirements` need, transitively,
    leaving out UNPINNED. Exits naming the requirement if one is missing or not satisfied."""
    versions: dict[str, str] = {}
    expanded: set[tuple[str, str]] = set()
    todo = [(req, "pyproject.toml") for req in requirements]
    while todo:
        req, needed_by = todo.pop()
        name = canonicalize_name(req.name)
        if name in UNPINNED:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{req} (needed by {needed_by}) is not installed in {sys.prefix}")
        if not req.specifier.contains(dist.version, prereleases=True):
            sys.exit(f"{req} (needed by {needed_by}): {sys.prefix} has {name} {dist.version}")
        versions[name] = dist.version
        for extra in {"", *req.extras}:
            if (name, extra) in expanded:
                continue
            expanded.add((name, extra))
            for line in dist.requires or []:
                sub = Requirement(line)
                if sub.marker is None or sub.marker.evaluate({"extra": extra}):
                    todo.append((sub, name))
    return versions


def render(versions: Mapping[str, str]) -> str:
    """The lock file's text: HEADER, then `name==version` lines sorted by name."""
    return HEADER + "".join(f"{name}=={versions[name]}\n" for name in sorted(versions))


def read(path: str = LOCK) -> dict[str, str]:
    """PEP 503 name -> pinned version of a lock file; exits on a line that is not `name==version`
    or on a name pinned twice."""
    pins: dict[str, str] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, version = line.partition("==")
            name = canonicalize_name(name.strip())
            if not sep or not version.strip() or name in pins:
                sys.exit(f"{path}:{number}: expected one `name==version` per name, got {line!r}")
            pins[name] = version.strip()
    return pins


def differences(locked: Mapping[str, str], installed: Mapping[str, str]) -> list[str]:
    """One line per package the lock and the venv disagree on; empty when they agree."""
    return [
        f"{name}: locked {locked.get(name, '(not locked)')}, "
        f"installed {installed.get(name, '(not needed)')}"
        for name in sorted(locked.keys() | installed.keys())
        if locked.get(name) != installed.get(name)
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    if here() != TARGET:
        sys.exit(f"requirements.lock is for {TARGET}; {sys.executable} is {here()}")
    installed = closure(root_requirements())
    if args.check:
        diff = differences(read(), installed)
        if diff:
            sys.exit(f"requirements.lock disagrees with {sys.prefix} (make lock rewrites it):\n"
                     + "\n".join(diff))
        print(f"requirements.lock matches {sys.prefix} ({len(installed)} packages)")
        return
    with open(LOCK, "w") as f:
        f.write(render(installed))
    print(f"wrote {LOCK} ({len(installed)} packages)")


if __name__ == "__main__":
    main()
