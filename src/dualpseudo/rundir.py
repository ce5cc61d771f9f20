"""The one place that builds paths inside a run directory (layout in DESIGN.md), and its lock.

One process (one launch, rank 0 for a data-parallel one) works in a run directory at a time: it holds an
advisory lock (`flock`) on `RUN_DIR/.lock` for the command's lifetime. The kernel drops the lock when the process
ends however it ends, so a crashed run leaves no stale lock; the file keeps the holder's PID for the message the
next process prints.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = ".lock"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (e.g. it was made by another config, or another run holds it)."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def env(self) -> Path:
        return self.root / "env.json"

    def stage(self, name: str, round: int = 1) -> Path:
        """`stage1`, `stage2`, `stage3`, `evaluation`; rounds after the first live in `roundN/`."""
        return self.root / name if round <= 1 else self.root / f"round{round}" / name

    @property
    def stage1(self) -> Path:
        return self.stage("stage1")

    @property
    def encoder(self) -> Path:
        """The run's self-supervised encoder step (one for all rounds)."""
        return self.root / "encoder"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def sample_grid(self) -> Path:
        """Where `dualpseudo sample` writes its grid unless told otherwise."""
        return self.root / "sample_grid.png"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"


_HELD: dict[str, int] = {}                  # resolved run directory -> fd of the lock this process holds


def lock(root: str | Path) -> bool:
    """Hold the run directory's lock until `unlock_all()` or the end of the process; True when held.

    Raises RunDirError naming the holder's PID when another process holds it. Holding it already (this process)
    is fine. A directory this process cannot write (read-only) and that has no lock file is used unlocked: no run
    can write there. The directory is created when missing."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    key = str(root.resolve())
    if key in _HELD:
        return True
    path = root / LOCK_FILE
    writable = True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        try:
            fd, writable = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), False
        except FileNotFoundError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        holder = _holder(fd)
        os.close(fd)
        raise RunDirError(f"run directory {root} is in use by another dualpseudo process ({holder}); wait for it "
                          f"to finish or stop it, or use another --run-dir") from None
    if writable:
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": sys.argv[1:2]})
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (record + "\n").encode(), 0)
        except OSError:
            pass                                # the lock holds without its note
    _HELD[key] = fd
    return True


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        where = "" if info.get("host") in (None, socket.gethostname()) else f" on {info['host']}"
        return f"PID {int(info['pid'])}{where}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "PID unknown"


def unlock_all() -> None:
    """Release every run-directory lock this process holds."""
    while _HELD:
        _, fd = _HELD.popitem()
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
