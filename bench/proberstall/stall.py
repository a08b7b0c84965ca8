# Injected machine stall: one SCHED_FIFO 50 spinner pinned per CPU (argv[3]: "0,1" or "0"),
# each spinning for argv[2] ms (one value, or one per CPU joined by +) at every multiple of argv[1] s on the monotonic clock (the
# same instants on every CPU), until argv[4] seconds have passed. Stands in for the ~50 ms
# stalls this VM shows now and then (a task at SCHED_FIFO 10 cannot run during them).
import os, sys, time
every, cpus, secs = float(sys.argv[1]), sys.argv[3], float(sys.argv[4])
mss = [float(m) / 1e3 for m in sys.argv[2].split("+")]
end = time.monotonic() + secs

from kids import reap_on_term  # noqa: E402 (this directory is on sys.path)

kids = []
reap_on_term(kids)
for i, cpu in enumerate(map(int, cpus.split(","))):
    ms = mss[min(i, len(mss) - 1)]
    pid = os.fork()
    if pid == 0:
        import ctypes, signal
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        os.sched_setaffinity(0, {cpu})
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
        while True:
            now = time.monotonic()
            at = (now // every + 1) * every
            if at > end:
                os._exit(0)
            time.sleep(at - now)
            while time.monotonic() < at + ms:
                pass
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
