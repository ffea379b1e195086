#!/usr/bin/env python3
"""Parses load generator output for compare.sh.

  parse.py wrk FILE
      -> "<requests> <req_per_s> <errors>"   errors = non-2xx/3xx responses + socket errors
  parse.py h2load FILE
      -> "<requests> <req_per_s> <errors>"   errors = failed + errored + timed-out requests and
                                             non-2xx/3xx responses
  parse.py oha RATE DURATION_S CSV...
      -> "<responses> <p50_ms> <p99_ms> <p99.9_ms> <non_2xx> <missing>"
         CSV files are oha --output-format csv (one row per response, latency corrected for
         coordinated omission when oha ran with --latency-correction); the latencies of all
         files are merged before taking percentiles (compare.sh runs one oha per arm).
         missing = requests the schedule called for (RATE * DURATION) that got no response.
"""
import math
import re
import sys


def wrk(path):
    text = open(path).read()
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m or not rps:
        print(f"cannot parse wrk output {path}:\n{text}", file=sys.stderr)
        sys.exit(1)
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(x) for x in sock.groups())
    print(f"{m.group(1)} {float(rps.group(1)):.1f} {errors}")


def h2load(path):
    text = open(path).read()
    # h2load prints the elapsed time in the unit that suits it: "999.88ms" or "5.00s".
    fin = re.search(r"finished in ([\d.]+)(?:us|ms|s), ([\d.]+) req/s", text)
    req = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout", text)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if not fin or not req or not codes:
        print(f"cannot parse h2load output {path}:\n{text}", file=sys.stderr)
        sys.exit(1)
    done = int(req.group(3))
    errors = int(req.group(5)) + int(req.group(6)) + int(req.group(7))
    errors += int(codes.group(3)) + int(codes.group(4))
    print(f"{done} {float(fin.group(2)):.1f} {errors}")


def percentile(sorted_vals, p):
    """Nearest-rank percentile of an ascending list (p in 0..100)."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def oha(rate, duration, paths):
    lat = []
    non2xx = 0
    for path in paths:
        with open(path) as f:
            header = f.readline().strip().split(",")
            i_dur = header.index("request-duration")
            i_status = header.index("status")
            for line in f:
                cols = line.rstrip("\n").split(",")
                if len(cols) <= max(i_dur, i_status):
                    continue
                lat.append(float(cols[i_dur]) * 1000.0)
                if not cols[i_status].startswith("2"):
                    non2xx += 1
    lat.sort()
    expected = int(float(rate) * float(duration))
    missing = max(0, expected - len(lat))
    print(
        f"{len(lat)} {percentile(lat, 50):.3f} {percentile(lat, 99):.3f} "
        f"{percentile(lat, 99.9):.3f} {non2xx} {missing}"
    )


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "wrk":
        wrk(sys.argv[2])
    elif len(sys.argv) >= 3 and sys.argv[1] == "h2load":
        h2load(sys.argv[2])
    elif len(sys.argv) >= 5 and sys.argv[1] == "oha":
        oha(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
