#!/usr/bin/env python3
"""Checks that a target serves the sticky 90/10 split by x-user-id.

usage: splitcheck.py URL NAME [--users N] [--exact-md5 WEIGHT] [--emit-uids FILE]

Sends N distinct user ids twice each over one keep-alive connection and checks: every answer is
200 with body "stable" or "canary"; the arm header (x-canaryd-upstream, if present) names the
same arm as the body; each user gets the same arm both times (sticky); the canary share is
within 10% +- 5 points. With --exact-md5 W (canaryd), every user must be on the arm the design
rule gives: canary iff bucket < W*100, bucket = (h%100)*100 + (h//100)%100, h = md5(uid).
For the direct baseline (NAME=direct) only status and body are checked.
An https:// URL is spoken to over TLS with ALPN http/1.1 and without verifying the certificate
(compare.sh's TLS modes use a self-signed one).
Prints one summary line; exits 1 on any failure.
"""
import argparse
import hashlib
import http.client
import ssl
import sys
import urllib.parse


def bucket(uid):
    h = int(hashlib.md5(uid.encode()).hexdigest(), 16)
    return (h % 100) * 100 + (h // 100) % 100


def connector(url):
    """A function opening a new HTTP/1.1 connection to URL's host: plain, or TLS for https."""
    u = urllib.parse.urlsplit(url)
    if u.scheme == "https":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        # http.client only offers http/1.1 by ALPN with a context of its own making
        ctx.set_alpn_protocols(["http/1.1"])
        return lambda: http.client.HTTPSConnection(u.hostname, u.port, timeout=5, context=ctx)
    return lambda: http.client.HTTPConnection(u.hostname, u.port, timeout=5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("name")
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--exact-md5", type=float, default=None)
    ap.add_argument("--emit-uids", default=None,
                    help="write 'STABLE_UID CANARY_UID' (one user id served by each arm) here")
    a = ap.parse_args()
    connect = connector(a.url)
    conn = connect()
    problems = []
    first = {}
    canary = 0
    for rnd in range(2):
        for i in range(1, a.users + 1):
            uid = f"user{i}"
            try:
                conn.request("GET", "/", headers={"x-user-id": uid})
                r = conn.getresponse()
                body = r.read().decode(errors="replace").strip()
                hdr = r.getheader("x-canaryd-upstream")
            except Exception as e:  # noqa: BLE001 - any transport error is a failure
                problems.append(f"{uid}: transport error {e!r}")
                conn.close()
                conn = connect()
                continue
            if r.status != 200 or body not in ("stable", "canary"):
                problems.append(f"{uid}: status {r.status} body {body[:60]!r}")
                continue
            if a.name == "direct":
                continue
            if hdr is not None and hdr != body:
                problems.append(f"{uid}: header says {hdr}, body says {body}")
            if rnd == 0:
                first[uid] = body
                canary += body == "canary"
                if a.exact_md5 is not None:
                    want = "canary" if bucket(uid) < a.exact_md5 * 100 else "stable"
                    if body != want:
                        problems.append(f"{uid}: served by {body}, md5 rule says {want}")
            elif first.get(uid) != body:
                problems.append(f"{uid}: not sticky ({first.get(uid)} then {body})")
    if a.emit_uids:
        st = next((u for u, arm in first.items() if arm == "stable"), "user1")
        ca = next((u for u, arm in first.items() if arm == "canary"), st)
        with open(a.emit_uids, "w") as f:
            f.write(f"{st} {ca}\n")
    share = canary / a.users * 100
    if a.name != "direct" and not (5.0 <= share <= 15.0):
        problems.append(f"canary share {share:.1f}% is not ~10%")
    status = "OK" if not problems else f"FAILED ({len(problems)} problems)"
    extra = "" if a.name == "direct" else f", canary share {share:.1f}%, sticky"
    print(f"split check {a.name}: {2 * a.users} requests{extra}: {status}")
    for p in problems[:10]:
        print(f"  {p}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
