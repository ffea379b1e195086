#!/usr/bin/env python3
"""CPU time and memory of a process tree, from /proc.

usage: procstat.py PID
prints: "<cpu_seconds> <hwm_kib> <rss_kib> <nprocs>"
usage: procstat.py --foreign ROOT SNAPSHOT_FILE [--diff]
  CPU of every user-space process that is not ROOT or one of its descendants (other
  people's work on a shared machine, e.g. a cargo build): without --diff, writes the total to
  SNAPSHOT_FILE; with --diff, prints the CPU seconds used since that snapshot, including
  processes that started and ended in between (counted through their parents' cutime).
  Kernel threads are left out (ksoftirqd works for our own load).

cpu_seconds is utime+stime (fields 14 and 15 of /proc/PID/stat, all threads of the process)
summed over PID and every descendant; hwm_kib is VmHWM (peak resident set) and rss_kib VmRSS,
both summed over the same processes (nginx master + workers, a single canaryd or haproxy).
"""
import os
import sys

TICK = os.sysconf("SC_CLK_TCK")


def stat_of(pid, with_children=False):
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # the command name may contain spaces: split after the closing parenthesis
    rest = data[data.rindex(")") + 2:].split()
    ppid = int(rest[1])
    ticks = int(rest[11]) + int(rest[12])  # utime + stime
    if with_children:
        ticks += int(rest[13]) + int(rest[14])  # cutime + cstime of reaped children
    return ppid, ticks


def mem_of(pid):
    hwm = rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return hwm, rss


def scan(with_children=False):
    children = {}
    ticks = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            ppid, t = stat_of(pid, with_children)
        except (OSError, ValueError):
            continue
        children.setdefault(ppid, []).append(pid)
        ticks[pid] = t
    return children, ticks


def tree_of(root, children):
    tree, todo = [], [root]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def foreign(root, path, diff):
    # The sum of utime+stime+cutime+cstime over a set of processes does not change when one
    # of them exits and is reaped by another (its time moves into the parent's cutime), so
    # its growth is the CPU the set used, short-lived build steps included.
    children, ticks = scan(with_children=True)
    ours = set(tree_of(root, children)) | set(tree_of(2, children)) | {os.getpid()}
    total = sum(t for p, t in ticks.items() if p not in ours)
    if not diff:
        with open(path, "w") as f:
            f.write(str(total))
        return
    with open(path) as f:
        before = int(f.read())
    print(f"{max(0, total - before) / TICK:.3f}")


def main():
    if sys.argv[1] == "--foreign":
        foreign(int(sys.argv[2]), sys.argv[3], "--diff" in sys.argv[4:])
        return
    root = int(sys.argv[1])
    children, ticks = scan()
    if root not in ticks:
        print("process %d not found" % root, file=sys.stderr)
        sys.exit(1)
    tree = tree_of(root, children)
    cpu = hwm = rss = 0
    n = 0
    for p in tree:
        try:
            h, r = mem_of(p)
        except OSError:
            continue
        cpu += ticks[p]
        hwm += h
        rss += r
        n += 1
    print(f"{cpu / TICK:.3f} {hwm} {rss} {n}")


if __name__ == "__main__":
    main()
