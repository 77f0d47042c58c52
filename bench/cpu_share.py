#!/usr/bin/env python3
"""CPU shares of the processes a benchmark runs on, one row a second, until stopped.

    python3 bench/cpu_share.py > cpu.txt & sampler=$!
    "$B" saga --clients 50 --orders 3000 ...
    kill "$sampler"; cat cpu.txt

Each row gives, for the last second, the cores (of all the machine has) spent by each
group of processes: the bench (`pipeline-bench`, which is the service under test and its
clients), every PostgreSQL backend together, the tansu broker and Redis, then the cores the
machine left idle (idle and iowait in /proc/stat). Stopping it (SIGTERM or SIGINT) prints
the rows, then their mean over the seconds in which the bench used at least half a core.
Linux only; reads /proc, starts nothing.
"""
import os
import signal
import sys
import time

GROUPS = ("pipeline-bench", "postgres", "tansu", "redis-server")


def process_times():
    """CPU ticks used so far by every live process, keyed by (pid, group)."""
    times = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as stat:
                line = stat.read()
        except OSError:
            continue  # ended meanwhile
        name = line[line.index("(") + 1 : line.rindex(")")]
        fields = line[line.rindex(")") + 2 :].split()
        group = "postgres" if name.startswith("postgres") else name
        if group in GROUPS:
            times[(pid, group)] = int(fields[11]) + int(fields[12])  # utime + stime
    return times


def machine_ticks():
    """(all ticks, idle ticks) of the machine so far."""
    with open("/proc/stat") as stat:
        values = [int(value) for value in stat.readline().split()[1:]]
    return sum(values), values[3] + values[4]


def main():
    cores = os.cpu_count() or 1
    rows = []

    def report(*_):
        print("second " + " ".join(GROUPS) + " idle   (cores)")
        for row in rows:
            print(" ".join(f"{value:.2f}" for value in row))
        busy = [row for row in rows if row[1] >= 0.5]
        if busy:
            means = [sum(row[i] for row in busy) / len(busy) for i in range(1, len(GROUPS) + 2)]
            print(f"mean over {len(busy)} s with the bench at >= 0.5 core: "
                  + " ".join(f"{group} {mean:.2f}" for group, mean in zip(GROUPS + ("idle",), means)))
        sys.exit(0)

    signal.signal(signal.SIGTERM, report)
    signal.signal(signal.SIGINT, report)
    before, (all_before, idle_before) = process_times(), machine_ticks()
    second = 0
    while True:
        time.sleep(1)
        second += 1
        now, (all_now, idle_now) = process_times(), machine_ticks()
        elapsed = all_now - all_before
        scale = cores / elapsed if elapsed else 0.0
        used = dict.fromkeys(GROUPS, 0)
        for key, ticks in now.items():
            # A process that started during the second counts from zero.
            used[key[1]] += ticks - before.get(key, 0)
        rows.append([float(second)] + [used[group] * scale for group in GROUPS]
                    + [(idle_now - idle_before) * scale])
        before, all_before, idle_before = now, all_now, idle_now


if __name__ == "__main__":
    main()
