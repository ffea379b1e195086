#!/usr/bin/env python3
"""Counts what loadclient.py saw during each reliability.sh test; prints one JSON object.

  analyze.py reload  CSV --weights 10,20
  analyze.py kill    CSV --weight 10 --t-kill T --t-restart T --t-reset T
  analyze.py latency CSV --t-start T --t-end T      (slowloris window [t-start, t-end))
  analyze.py sigterm CSV --t-term T

A request failed when it got no response or a non-2xx status. "served" is the upstream that
really answered (the body the upstream wrote), falling back to the x-canaryd-upstream header.
The expected arm of a user at weight W percent is canary iff bucket < W*100 (README, "How
routing works").
"""
import argparse
import csv
import json
import math
import sys


def load(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["t_sched"] = float(r["t_sched"])
        r["t_send"] = float(r["t_send"])
        r["t_end"] = float(r["t_end"])
        r["bucket"] = int(r["bucket"])
        r["status"] = int(r["status"])
        r["served"] = r["body"] or r["arm"]
        r["ok"] = 200 <= r["status"] < 300
    return rows


def pct(vals, p):
    if not vals:
        return None
    vals = sorted(vals)
    k = max(0, min(len(vals) - 1, math.ceil(p / 100 * len(vals)) - 1))
    return round(vals[k], 3)


def latency_ms(rows):
    lat = [(r["t_end"] - r["t_sched"]) * 1000 for r in rows if r["ok"]]
    return {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "p999_ms": pct(lat, 99.9)}


def errs(rows):
    out = {}
    for r in rows:
        if not r["ok"]:
            k = r["err"] or f"status {r['status']}"
            out[k] = out.get(k, 0) + 1
    return out


def expected(bucket, weight):
    return "canary" if bucket < weight * 100 else "stable"


def reload_(a):
    rows = load(a.csv)
    weights = [float(w) for w in a.weights.split(",")]
    failed = [r for r in rows if not r["ok"]]
    mis = [r for r in rows if r["ok"] and r["served"] not in {expected(r["bucket"], w) for w in weights}]
    hdr = [r for r in rows if r["ok"] and r["arm"] and r["body"] and r["arm"] != r["body"]]
    flipped = [r for r in rows if r["ok"] and min(weights) * 100 <= r["bucket"] < max(weights) * 100]
    return {
        "sent": len(rows), "failed": len(failed), "misrouted": len(mis),
        "arm_header_mismatch": len(hdr), "errors": errs(rows),
        "moving_users_requests": len(flipped),
        "moving_users_on_canary": sum(r["served"] == "canary" for r in flipped),
        "examples_misrouted": [f"{r['uid']} bucket {r['bucket']} served by {r['served']}" for r in mis[:5]],
        **latency_ms(rows),
    }


def kill(a):
    rows = load(a.csv)
    w = a.weight

    def phase(r):
        t = r["t_send"]
        if t < a.t_kill:
            return "before_kill"
        if t < a.t_restart:
            return "canary_down"
        if t < a.t_reset:
            return "restarted_tripped"
        return "after_reset"

    out = {"sent": len(rows), "failed": sum(not r["ok"] for r in rows)}
    by = {}
    for r in rows:
        arm = expected(r["bucket"], w)
        key = f"{phase(r)}"
        d = by.setdefault(key, {"sent": 0, "stable_users_sent": 0, "stable_users_failed": 0,
                                "canary_users_sent": 0, "canary_users_failed": 0,
                                "canary_users_failed_get": 0, "canary_users_failed_post": 0,
                                "canary_users_served_by_stable": 0, "canary_users_served_by_canary": 0})
        d["sent"] += 1
        d[f"{arm}_users_sent"] += 1
        if not r["ok"]:
            d[f"{arm}_users_failed"] += 1
            if arm == "canary":
                d[f"canary_users_failed_{r['method'].lower()}"] += 1
        elif arm == "canary":
            d[f"canary_users_served_by_{r['served']}"] = d.get(f"canary_users_served_by_{r['served']}", 0) + 1
    out["phases"] = by
    out["stable_users_failed"] = sum(d["stable_users_failed"] for d in by.values())
    out["canary_users_failed"] = sum(d["canary_users_failed"] for d in by.values())
    # never allowed: a stable user on the canary; a canary user on stable while the canary is up
    # and untripped (before the kill or after the reset)
    mis = [r for r in rows if r["ok"] and (
        (expected(r["bucket"], w) == "stable" and r["served"] == "canary")
        or (expected(r["bucket"], w) == "canary" and r["served"] == "stable"
            and phase(r) in ("before_kill",)))]
    out["misrouted"] = len(mis)
    out["errors"] = errs(rows)
    return out


def latency(a):
    rows = load(a.csv)
    before = [r for r in rows if r["t_sched"] < a.t_start]
    during = [r for r in rows if a.t_start <= r["t_sched"] < a.t_end]
    after = [r for r in rows if r["t_sched"] >= a.t_end]
    def part(rs):
        return {"sent": len(rs), "failed": sum(not r["ok"] for r in rs), **latency_ms(rs)}
    return {"sent": len(rows), "failed": sum(not r["ok"] for r in rows), "misrouted": 0,
            "before": part(before), "during": part(during), "after": part(after),
            "errors": errs(rows)}


def sigterm(a):
    rows = load(a.csv)
    before = [r for r in rows if r["t_send"] < a.t_term]
    in_flight = [r for r in before if r["t_end"] >= a.t_term]
    after = [r for r in rows if r["t_send"] >= a.t_term]
    return {
        "sent": len(rows), "sent_before_sigterm": len(before),
        "failed_before_sigterm": sum(not r["ok"] for r in before),
        "in_flight_at_sigterm": len(in_flight),
        "in_flight_completed": sum(r["ok"] for r in in_flight),
        "in_flight_failed": sum(not r["ok"] for r in in_flight),
        "in_flight_errors": errs(in_flight),
        "last_in_flight_end_after_sigterm_s": round(max((r["t_end"] for r in in_flight), default=a.t_term) - a.t_term, 3),
        "sent_after_sigterm": len(after),
        "after_sigterm_ok": sum(r["ok"] for r in after),
        "after_sigterm_errors": errs(after),
        "misrouted": 0,
    }


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("reload"); p.add_argument("csv"); p.add_argument("--weights", required=True)
    p = sub.add_parser("kill"); p.add_argument("csv"); p.add_argument("--weight", type=float, required=True)
    for k in ("t-kill", "t-restart", "t-reset"):
        p.add_argument(f"--{k}", type=float, required=True)
    p = sub.add_parser("latency"); p.add_argument("csv")
    p.add_argument("--t-start", type=float, required=True); p.add_argument("--t-end", type=float, required=True)
    p = sub.add_parser("sigterm"); p.add_argument("csv"); p.add_argument("--t-term", type=float, required=True)
    a = ap.parse_args()
    fn = {"reload": reload_, "kill": kill, "latency": latency, "sigterm": sigterm}[a.cmd]
    print(json.dumps(fn(a)))


if __name__ == "__main__":
    sys.exit(main())
