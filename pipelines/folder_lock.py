"""An exclusive lock on an output folder, so that two jobs never write into the same folder at once.

The lock is a file `OUT/_lock.json` created with O_EXCL and holding its owner: host, pid, the
process's start time, when it started, and the command. The owner touches the file every
`HEARTBEAT_S` seconds while it runs and deletes it when it ends. A lock is stale, and is taken over
with a warning, when its owner is on this host and its process is gone (or the pid now belongs to
another process), or when its owner is on another host and the file has not been touched for
`STALE_AFTER_S` seconds (another host's processes cannot be seen from here). O_EXCL is atomic on
local filesystems and on NFS v3 and later.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from pipelines.ray_reaper import process_start

LOCK_FILE = "_lock.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
_WRITING_S = 10.0  # a lock file this young may still be being written: unreadable is not yet stale

logger = logging.getLogger(__name__)


class FolderLockedError(RuntimeError):
    """Another running job holds the output folder's lock."""


def _pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_reason(owner: dict | None, age_s: float, host: str | None = None) -> str | None:
    """Why a lock with this owner, last touched `age_s` seconds ago, is stale; None while it is held."""
    host = host or socket.gethostname()
    if owner is None:
        return None if age_s < _WRITING_S else "the lock file is unreadable"
    if owner.get("host") == host:
        pid = int(owner.get("pid", -1))
        if pid <= 0 or not _pid_alive(pid):
            return f"its process {pid} on this host is gone"
        recorded, now = owner.get("process_start"), process_start(pid)
        if recorded is not None and now is not None and recorded != now:
            return f"pid {pid} now belongs to another process"
        return None
    if age_s > STALE_AFTER_S:
        return f"no heartbeat from {owner.get('host')} for {age_s:.0f} s"
    return None


class FolderLock:
    """Context manager: hold `folder/_lock.json` for the duration of a job."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_start": process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:500],
            "token": uuid.uuid4().hex,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raise FolderLockedError while another job holds it."""
        data = json.dumps(self.owner, indent=2).encode("utf-8")
        for _ in range(5):  # another job may take over the same stale lock at the same moment
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._check_holder()
                continue
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._thread = threading.Thread(target=self._heartbeat, name="folder-lock", daemon=True)
            self._thread.start()
            return
        raise FolderLockedError(f"could not take the lock {self.path}: it keeps changing hands")

    def _check_holder(self) -> None:
        """Raise if the existing lock is held; remove it if it is stale."""
        try:
            text = self.path.read_text(encoding="utf-8")
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:  # released meanwhile: try again
            return
        try:
            owner = json.loads(text)
        except ValueError:
            owner = None
        reason = stale_reason(owner if isinstance(owner, dict) else None, age)
        if reason is None:
            raise FolderLockedError(self._held_message(owner or {}))
        logger.warning("taking over the stale lock %s (%s)", self.path, reason)
        grave = self.path.with_name(f".{LOCK_FILE}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:  # someone else took it over first
            return
        if grave.read_text(encoding="utf-8") != text:  # it changed hands meanwhile: put it back
            try:
                os.link(grave, self.path)
            except OSError:
                pass
        grave.unlink(missing_ok=True)

    def _held_message(self, owner: dict) -> str:
        """One line for a job that finds the folder locked."""
        where = "this host" if owner.get("host") == socket.gethostname() else f"host {owner.get('host')}"
        msg = (
            f"{self.path.parent} is in use by another extract job (pid {owner.get('pid')} on {where}, "
            f"started {owner.get('started')}); wait for it to finish or use another --out"
        )
        if where != "this host":
            msg += (
                f"; if that job is gone, the lock counts as stale {STALE_AFTER_S:.0f} s after its last "
                f"heartbeat, or delete {self.path}"
            )
        return msg

    def _heartbeat(self) -> None:
        """Touch the lock file every HEARTBEAT_S seconds until released."""
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            if json.loads(self.path.read_text(encoding="utf-8")).get("token") == self.owner["token"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
