#!/usr/bin/env python3
"""Writes benches/load/RELIABILITY.md from reliability.sh's t1..t4 JSON files.

Exits 1 when a check fails. With --smoke prints the summary table only, and the latency
comparison of test 3 is informative (windows of a second are too short to judge a p99).
"""
import argparse
import json
import os
import sys


def load(d, name):
    p = os.path.join(d, name)
    return json.load(open(p)) if os.path.exists(p) else None


def ms(v):
    return "—" if v is None else f"{v:.2f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out")
    ap.add_argument("--smoke", action="store_true")
    for k in ("date", "machine", "canaryd", "command", "params"):
        ap.add_argument(f"--{k}", default="")
    a = ap.parse_args()
    t1, t2, t3, t4 = (load(a.dir, f"t{i}.json") for i in range(1, 5))
    rows, fails = [], []

    def check(name, ok, what):
        if not ok:
            fails.append(f"{name}: {what}")
        return "PASS" if ok else "FAIL"

    if t1:
        ok = t1["failed"] == 0 and t1["misrouted"] == 0 and t1["arm_header_mismatch"] == 0 and t1["proxy_alive"]
        rows.append(("1. 200 reloads (10 ↔ 20 %)" if not a.smoke else f"1. {t1['rewrites']} reloads",
                     t1["sent"], t1["failed"], t1["misrouted"],
                     f"{t1['reloads_applied']} reloads applied of {t1['rewrites']} rewrites",
                     check("reloads", ok, "failed or mis-routed requests")))
    else:
        fails.append("reloads: no result")
    if t2:
        after = t2["phases"].get("after_reset", {})
        ok = (t2["stable_users_failed"] == 0 and t2["misrouted"] == 0 and t2["tripped"]
              and t2["proxy_alive"] and t2["healthz"] == "200"
              and after.get("canary_users_served_by_canary", 0) > 0)
        rows.append(("2. canary killed + restarted", t2["sent"], t2["failed"], t2["misrouted"],
                     f"stable-arm users failed {t2['stable_users_failed']}, canary-arm users failed "
                     f"{t2['canary_users_failed']}; tripped: {'yes' if t2['tripped'] else 'NO'}"
                     f" ({t2.get('trip_reason')}, {t2.get('seconds_kill_to_trip')} s after the kill)",
                     check("canary kill", ok, "stable users failed, no trip, proxy down or canary not back")))
    else:
        fails.append("canary kill: no result")
    if t3:
        b, d = t3["before"], t3["during"]
        sl = t3.get("slowloris") or {}
        held = sl.get("max_open", 0) >= 0.9 * (sl.get("idle", 0) + sl.get("slow", 0))
        lat_ok = (b["p99_ms"] is not None and d["p99_ms"] is not None
                  and d["p99_ms"] <= 2 * b["p99_ms"] + 1.0)
        ok = t3["failed"] == 0 and t3["proxy_alive"] and held and (lat_ok or a.smoke)
        rows.append((f"3. {sl.get('idle', '?')} idle + {sl.get('slow', '?')} slowloris connections",
                     t3["sent"], t3["failed"], t3["misrouted"],
                     f"p99 before {ms(b['p99_ms'])}, during {ms(d['p99_ms'])}; {sl.get('max_open', '?')} held open; "
                     f"server closed {sl.get('closed_slow', '?')} slowloris and {sl.get('closed_idle', '?')} idle connections",
                     check("slowloris", ok, "failures, connections not held, or p99 during > 2× before + 1 ms")))
    else:
        fails.append("slowloris: no result")
    if t4:
        ok = t4["in_flight_failed"] == 0 and t4["failed_before_sigterm"] == 0 and t4["exit_code"] == 0
        rows.append(("4. SIGTERM under load", t4["sent"], t4["failed_before_sigterm"], t4["misrouted"],
                     f"{t4['in_flight_at_sigterm']} in flight at the signal: {t4['in_flight_completed']} completed, "
                     f"{t4['in_flight_failed']} failed; exit {t4['exit_code']} after {t4['seconds_to_exit']} s",
                     check("sigterm", ok, "in-flight requests failed or exit code not 0")))
    else:
        fails.append("sigterm: no result")

    table = ["| test | requests sent | failed | mis-routed | what was seen | result |",
             "|---|---:|---:|---:|---|---|"]
    table += [f"| {r[0]} | {r[1]:,} | {r[2]:,} | {r[3]:,} | {r[4]} | {r[5]} |" for r in rows]
    table = "\n".join(table)
    print(table)
    for f in fails:
        print(f"FAIL {f}", file=sys.stderr)
    if a.smoke or not a.out:
        return 1 if fails else 0

    def block(d):
        return "```json\n" + json.dumps(d, indent=2) + "\n```"

    md = f"""# Reliability under load: canaryd

Produced by `benches/load/reliability.sh` (see `benches/load/README.md`).

- Date: {a.date}
{a.machine}
- canaryd: {a.canaryd} (default worker threads), metrics and rollback circuit on
- Command: `{a.command.strip()}`
- Parameters: {a.params}

Load: `tools/loadclient.py`, keep-alive HTTP/1.1 at a fixed rate, a random `x-user-id` of 10,000
per request, every request logged. **Failed** = no response or a non-2xx status. **Mis-routed** =
answered by an arm the routing rule does not give that user (test 1: neither the old nor the new
weight's arm; test 2: a stable-arm user answered by the canary, or a canary-arm user answered by
stable while the canary was up and untripped). The arm is the upstream that really answered (its
body), cross-checked with `x-canaryd-upstream`. Upstreams: two `tools/upstream.py` processes.

## Summary

{table}

## 1. Config reloads under load

The config file is rewritten {t1['rewrites'] if t1 else '?'} times by rename (temp file + `mv`), alternating the
canary weight between 10 and 20 %, every {a.params.split('gap=')[1].split()[0] if 'gap=' in a.params else '?'} (canaryd debounces file events for 100 ms).
Requests of users whose arm depends on the weight (buckets 1000–1999):
{t1['moving_users_requests'] if t1 else '?'}, of which {t1['moving_users_on_canary'] if t1 else '?'} were answered by the canary.

{block(t1) if t1 else 'no result'}

## 2. Canary upstream killed and restarted

The canary upstream gets SIGKILL under load (half GETs, half POSTs with a 64-byte body), the
script polls `GET /weights` until the canary shows as tripped, restarts the upstream, then
`POST /reset`. Phases are by request send time. GETs of canary-arm users whose canary refuses
the connection fail over to stable (README "Failover"); POSTs cannot and get 502, until the
circuit trips and the canary's users go to stable.

{block(t2) if t2 else 'no result'}

## 3. Idle and slowloris connections

While the load runs, `tools/slowloris.py` holds idle connections (connect, send nothing) and
slowloris connections (a request line, then one header line a second, never finishing), and
reopens any the server closes (`closed_slow` / `closed_idle` count the server's closes of
each kind: canaryd's `header_read_timeout`, 10 s by default, applies once a request head has
started). Latency is measured from each request's scheduled send time
(coordinated omission corrected) by the Python client, so its absolute values include the
client's own overhead; the comparison before/during is what matters.

{block(t3) if t3 else 'no result'}

## 4. SIGTERM under load

Requests ask the upstream for a 200 ms answer (`?sleep_ms=200`), so many are in flight when
canaryd gets SIGTERM (`drain_timeout = "10s"`). "In flight" = sent before the signal, not
finished at it. Requests sent after the signal are expected to be refused.

{block(t4) if t4 else 'no result'}
"""
    with open(a.out, "w") as f:
        f.write(md)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
