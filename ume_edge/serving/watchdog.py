"""A small process that outlives ``python -m ume_edge.serve`` just long enough to clean up after it.

``serve`` starts it in a session of its own and tells it, on its stdin, which processes (``pid PID START``) and
folders (``path PATH``) it owns. When ``serve`` ends cleanly it writes ``release`` first; when ``serve`` dies any other
way (``kill -9`` included) the pipe closes without it, and the watchdog stops those processes and their children
(SIGTERM, then SIGKILL after a grace period) and removes the folders. A process id is matched with its start time,
so a number the system has given to another process since is never signalled.

    python -m ume_edge.serving.watchdog PARENT_PID
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE_S = 2.0


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), or None if it is gone
    (a zombie, which has ended and only waits for its parent to collect it, counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found + [grandchild for child in found for grandchild in descendants(child)]


class Watchdog:
    """The serving process's side: start the watchdog, tell it what to clean up, release it on a clean exit."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-m", "ume_edge.serving.watchdog", str(os.getpid())],
                                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        text=True, start_new_session=True)

    def _tell(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def watch_process(self, pid: int) -> None:
        """``pid`` and, when the watchdog acts, its children then."""
        started = start_time(pid)
        if started is not None:
            self._tell(f"pid {pid} {started}")

    def watch_tree(self, pid: int) -> None:
        """``pid`` and every process below it now (children reparented when it dies are still found)."""
        for member in [pid, *descendants(pid)]:
            self.watch_process(member)

    def watch_path(self, path: Path) -> None:
        self._tell(f"path {path}")

    def release(self) -> None:
        """The serving process is ending cleanly: nothing to clean up."""
        if self.process.poll() is None:
            self._tell("release")
            self.process.stdin.close()
            self.process.wait(timeout=10)


def _stop(processes: dict[int, str]) -> None:
    alive: dict[int, str | None] = {pid: started for pid, started in processes.items() if start_time(pid) == started}
    for pid in list(alive):
        alive.update({child: start_time(child) for child in descendants(pid)})
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid, started in alive.items():
            if started is not None and start_time(pid) == started:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline and any(start_time(pid) == s for pid, s in alive.items() if s):
            time.sleep(0.05)


def main(argv: list[str]) -> int:
    processes: dict[int, str] = {}
    paths: list[Path] = []
    for line in sys.stdin:
        kind, _, rest = line.strip().partition(" ")
        if kind == "release":
            return 0
        if kind == "pid":
            pid, started = rest.split()
            processes[int(pid)] = started
        elif kind == "path":
            paths.append(Path(rest))
    _stop(processes)  # the serving process died without releasing us
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for serve must not stop its cleanup
    sys.exit(main(sys.argv[1:]))
