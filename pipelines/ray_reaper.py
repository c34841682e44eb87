"""Stop what an embedded Ray instance leaves behind when its driver dies without shutting it down.

Ray ties its GCS server and raylet to the driver (the kernel kills them with it), but the raylet's
DashboardAgent and RuntimeEnvAgent notice the raylet's death, then spend about a minute trying to
report it to the dead GCS before they exit. `start_reaper` runs this file as a small watchdog process
in its own session: it learns which processes the embedded instance consists of (the driver's
children that appeared during `ray.init`, and every descendant of those, re-read each second) and
reads a pipe from the driver. A clean shutdown writes `q` and the watchdog just exits; end of file
without `q` means the driver died (kill -9 included), and the watchdog then stops every process it
recorded: SIGTERM, and SIGKILL for those still alive a moment later.

Linux only (it reads /proc). Nothing can help when the watchdog itself is killed as well. The file
imports only the standard library, because it runs as a script, outside the package.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 1.0  # how often the watchdog re-reads the process tree
GRACE_S = 2.0  # between SIGTERM and SIGKILL
_QUIT = b"q"


def stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state, parent pid, ...; [19] is the start time), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    return stat.rsplit(")", 1)[1].split()


def process_start(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot; with the pid it names one process for good."""
    fields = stat_fields(pid)
    return fields[19] if fields else None


def process_table() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, start time in clock ticks)} of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        fields = stat_fields(int(entry)) if entry.isdigit() else None
        if fields:  # None: not a process, or it ended while the table was read
            table[int(entry)] = (int(fields[1]), fields[19])
    return table


def children(pid: int) -> set[int]:
    """Pids whose parent is `pid` now."""
    return {p for p, (parent, _) in process_table().items() if parent == pid}


def descendants(roots: set[int], table: dict[int, tuple[int, str]] | None = None) -> dict[int, str]:
    """{pid: start time} of the living `roots` and every process below them."""
    table = process_table() if table is None else table
    below: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        below.setdefault(parent, []).append(pid)
    found: dict[int, str] = {}
    stack = [p for p in roots if p in table]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found[pid] = table[pid][1]
            stack.extend(below.get(pid, ()))
    return found


def alive(recorded: dict[int, str]) -> dict[int, str]:
    """The recorded processes that still run (same pid and start time, not a zombie)."""
    out = {}
    for pid, start in recorded.items():
        fields = stat_fields(pid)
        if fields and fields[19] == start and fields[0] != "Z":
            out[pid] = start
    return out


def terminate(recorded: dict[int, str], grace_s: float = GRACE_S) -> None:
    """SIGTERM the recorded processes that still run, then SIGKILL those left after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive(recorded):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        while alive(recorded) and time.monotonic() < deadline:
            time.sleep(0.05)


def watch(roots: set[int], pipe_fd: int = 0) -> None:
    """Record the tree below `roots` until the pipe says quit (return) or closes (stop the tree)."""
    recorded = descendants(roots)
    while True:
        # walk from recorded processes that still run only: a reused pid must not pull strangers in
        recorded.update(descendants(set(alive(recorded))))
        ready, _, _ = select.select([pipe_fd], [], [], POLL_S)
        if ready:
            data = os.read(pipe_fd, 1)
            if data == _QUIT:
                return
            if not data:  # the driver is gone
                recorded.update(descendants(set(alive(recorded))))
                terminate(recorded)
                return


class Reaper:
    """The driver's handle on a watchdog process (see the module docstring)."""

    def __init__(self, process: subprocess.Popen, pipe_fd: int) -> None:
        self.process = process
        self.pipe_fd = pipe_fd

    def stop(self) -> None:
        """Tell the watchdog that the driver shut Ray down itself, and let it exit."""
        try:
            os.write(self.pipe_fd, _QUIT)
        except OSError:
            pass
        os.close(self.pipe_fd)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_reaper(roots: set[int]) -> Reaper | None:
    """Start a watchdog for the processes `roots` (and their descendants); None where /proc is missing."""
    if not roots or not sys.platform.startswith("linux"):
        return None
    read_fd, write_fd = os.pipe()  # not inheritable: only the watchdog gets the read end, as its stdin
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *map(str, sorted(roots))],
        stdin=read_fd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C or a kill of the driver's process group does not reach it
    )
    os.close(read_fd)
    return Reaper(process, write_fd)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch({int(a) for a in sys.argv[1:]})
