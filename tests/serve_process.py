"""`slimlm serve` as users run it: a subprocess on loopback, started and stopped the way a user does."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

URL_LINE = re.compile(r"at (http://127\.0\.0\.1:\d+)/v1")


def start_serve(
    args: list[str], *, env: dict | None = None, timeout: float = 120.0
) -> tuple[subprocess.Popen, str | None, list[str]]:
    """Start `python -m slimlm.cli serve --port 0 ARGS`. Returns (the process, its base URL, or None when
    it exited or printed none within `timeout` seconds, and its stderr lines, which keep growing)."""
    cmd = [sys.executable, "-m", "slimlm.cli", "serve", "--port", "0", *args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    deadline = time.monotonic() + timeout
    url = None
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        found = [m for line in list(lines) if (m := URL_LINE.search(line))]
        url = found[0].group(1) if found else None
        time.sleep(0.1)
    return proc, url, lines


def _ctrl_c_as_in_a_terminal() -> None:
    """SIGINT at its default in the server, as in a terminal. A test run launched in the background by a
    non-interactive shell (`.ci/run &`, nohup) inherits SIGINT ignored, and Python then keeps ignoring
    it: the server would rightly not stop on the Ctrl-C this module sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_serve(proc: subprocess.Popen) -> None:
    """Ctrl-C, as a user stops it; killed only when it has not exited 30 s later."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
