# CPU load for the bench: 2 busy loops, 2 fork/exec loops, 1 write+fsync loop (SCHED_OTHER).
import os, subprocess, sys, tempfile, time
end = time.monotonic() + float(sys.argv[1])

from kids import reap_on_term  # noqa: E402 (this directory is on sys.path)

kids = []
reap_on_term(kids)
for kind in ("busy", "busy", "exec", "exec", "io"):
    pid = os.fork()
    if pid == 0:
        import ctypes, signal
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if kind == "busy":
            while time.monotonic() < end:
                sum(range(10000))
        elif kind == "exec":
            while time.monotonic() < end:
                subprocess.run(["/bin/true"])
        else:
            fd, path = tempfile.mkstemp()
            while time.monotonic() < end:
                os.write(fd, os.urandom(1 << 20)); os.fsync(fd); os.ftruncate(fd, 0); os.lseek(fd, 0, 0)
            os.unlink(path)
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
