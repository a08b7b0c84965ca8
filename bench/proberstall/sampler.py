# One SCHED_FIFO 10 sampler pinned to CPU argv[1]: time.sleep(0.005) in a loop; logs every
# wake-up later than 2 ms as [start of lateness, wake] on the monotonic clock.
import json, os, sys, time
cpu = int(sys.argv[1]); os.sched_setaffinity(0, {cpu})
os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
out = open(sys.argv[2], "w"); end = time.monotonic() + float(sys.argv[3]); n = 0
while time.monotonic() < end:
    t = time.monotonic(); time.sleep(0.005); t1 = time.monotonic(); n += 1
    late = t1 - t - 0.005
    if late > 0.002:
        out.write(json.dumps({"cpu": cpu, "s": t + 0.005, "e": t1, "late": late}) + "\n")
out.write(json.dumps({"cpu": cpu, "samples": n}) + "\n"); out.close()
