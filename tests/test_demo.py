"""`dcdeploy demo` runs end to end and leaves no process behind, also when interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                pids.append(int(entry))
    return pids


def start_demo(*args: str) -> tuple[subprocess.Popen, str]:
    # SIGINT back to its default in the child: a test run started in the background (where
    # the shell ignores SIGINT, and children inherit that) must still be able to interrupt.
    proc = subprocess.Popen([sys.executable, "-m", "supervisor_dcdeploy.cli", "demo", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.readline()
    assert "work directory" in first, first
    return proc, first.rsplit(" ", 1)[1].strip()


def test_demo_converges_and_cleans_up():
    proc, workdir = start_demo("--hosts", "3")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "converged: all 3 hosts" in out
    assert processes_mentioning(workdir) == []
    assert not Path(workdir).exists()


def test_demo_interrupted_leaves_nothing_behind():
    proc, workdir = start_demo("--hosts", "3")
    for line in proc.stdout:  # interrupt mid-deploy
        if "queued:" in line:
            break
    assert processes_mentioning(workdir), "the demo's hosts should be running now"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert processes_mentioning(workdir) == []
