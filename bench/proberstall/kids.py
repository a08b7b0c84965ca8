"""Children that end with the bench's helper scripts (load.py, stall.py)."""
import ctypes
import os
import signal


def reap_on_term(kids):
    """SIGTERM (or the bench dying: SIGKILL via PR_SET_PDEATHSIG) ends the children too."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    def term(*_):
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(0)
    signal.signal(signal.SIGTERM, term)
