#!/usr/bin/env python3
"""Turns compare.sh's per-round TSV files into the markdown of benches/load/RESULTS.md.

Every figure in the main table is the median over rounds, and the peer table divides those
medians. The targets are judged on per-round ratios: canaryd's figure over each peer's in the
same round, their median and a bootstrap 95% interval.
"""
import argparse
import random
import statistics
import sys

# canaryd-pgo (compare.sh --pgo) is the same code built with profile-guided optimisation;
# canaryd-base (compare.sh --against REV) is an earlier revision; canaryd-shadow-slow and
# canaryd-shadow-dead (compare.sh --shadow) copy every request to a slow or a dead shadow.
# Each appears only when it was measured.
ALL_TARGETS = [
    "direct",
    "canaryd",
    "canaryd-pgo",
    "canaryd-base",
    "canaryd-shadow-slow",
    "canaryd-shadow-dead",
    "nginx",
    "haproxy",
]
OPTIONAL = {"canaryd-pgo", "canaryd-base", "canaryd-shadow-slow", "canaryd-shadow-dead"}
# The builds of this tree, checked against the targets.
CANARYDS = ["canaryd", "canaryd-pgo"]


def measured(thr, lat):
    """The targets of ALL_TARGETS in this run (the optional ones only if they have rows)."""
    seen = {r["target"] for r in thr} | {r["target"] for r in lat}
    return [t for t in ALL_TARGETS if t not in OPTIONAL or t in seen]


def p99_wins(lat, a, b):
    """(rounds in which a's p99 was lower than b's, rounds in which both were measured)."""
    v = by_round(lat, "p99_ms")
    rounds = set(v.get(a, {})) & set(v.get(b, {}))
    return sum(v[a][r] < v[b][r] for r in rounds), len(rounds)


def wins_text(lat, a, b):
    won, n = p99_wins(lat, a, b)
    return f"{won} of {n}" if n else "—"


MIB = 1024.0


def read_tsv(path):
    try:
        lines = [l.rstrip("\n").split("\t") for l in open(path)]
    except FileNotFoundError:
        return []
    if not lines:
        return []
    head = lines[0]
    return [dict(zip(head, l)) for l in lines[1:] if l and l[0]]


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, digits=1):
    if v is None:
        return "—"
    return f"{v:,.{digits}f}"


def ratio(a, b, digits=2):
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.{digits}f}×"


def summarize(thr, lat):
    # Keyed by the measured targets, in table order: the tables below iterate over it.
    s = {t: {} for t in measured(thr, lat)}
    for t in s:
        rows = [r for r in thr if r["target"] == t]
        if rows:
            s[t]["rps"] = med(float(r["rps"]) for r in rows)
            s[t]["errors"] = sum(int(r["errors"]) for r in rows)
            s[t]["up_cores_sat"] = med(float(r["upstream_cpu_s"]) / float(r["seconds"]) for r in rows)
            if t != "direct":
                s[t]["cpu10k_sat"] = med(float(r["cpu_s"]) / int(r["requests"]) * 1e4 for r in rows if int(r["requests"]))
                s[t]["cores_sat"] = med(float(r["cpu_s"]) / float(r["seconds"]) for r in rows)
                s[t]["hwm"] = med(int(r["hwm_kib"]) / MIB for r in rows)
        rows = [r for r in lat if r["target"] == t]
        if rows:
            s[t]["p50"] = med(float(r["p50_ms"]) for r in rows)
            s[t]["p99"] = med(float(r["p99_ms"]) for r in rows)
            s[t]["p999"] = med(float(r["p999_ms"]) for r in rows)
            s[t]["errors"] = s[t].get("errors", 0) + sum(int(r["non2xx"]) for r in rows)
            s[t]["missing"] = sum(int(r["missing"]) for r in rows)
            if t != "direct":
                s[t]["cpu10k_fixed"] = med(float(r["cpu_s"]) / int(r["responses"]) * 1e4 for r in rows if int(r["responses"]))
                s[t]["rss_fixed"] = med(int(r["rss_kib"]) / MIB for r in rows)
                s[t]["hwm"] = max(s[t].get("hwm") or 0, med(int(r["hwm_kib"]) / MIB for r in rows))
    return s


def main_table(s):
    out = [
        "| target | req/s at saturation | × direct | p50 ms | p99 ms | p99.9 ms | CPU s / 10k req (saturated) | CPU s / 10k req (fixed rate) | peak RSS MiB | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    d = s["direct"].get("rps")
    for t, x in s.items():
        if not has_figures(x):
            continue
        out.append(
            f"| {t} | {fmt(x.get('rps'), 0)} | {ratio(x.get('rps'), d)} | {fmt(x.get('p50'), 3)} | "
            f"{fmt(x.get('p99'), 3)} | {fmt(x.get('p999'), 3)} | {fmt(x.get('cpu10k_sat'), 3)} | "
            f"{fmt(x.get('cpu10k_fixed'), 3)} | {fmt(x.get('hwm'), 1)} | {x.get('errors', '—')} |"
        )
    return "\n".join(out)


def has_figures(x):
    """Whether a target has any figure (compare.sh --h2 has no direct target)."""
    return x.get("rps") is not None or x.get("p50") is not None


def peer_table(s, lat, who="canaryd", peers=("nginx", "haproxy", "direct")):
    peers = tuple(p for p in peers if p in s and has_figures(s[p]))
    c = s[who]
    rows = [
        ("throughput (req/s), higher is better", "rps"),
        ("p50 latency, lower is better", "p50"),
        ("p99 latency, lower is better", "p99"),
        ("p99.9 latency, lower is better", "p999"),
        ("CPU per request at saturation, lower is better", "cpu10k_sat"),
        ("CPU per request at fixed rate, lower is better", "cpu10k_fixed"),
        ("peak RSS, lower is better", "hwm"),
    ]
    names = {"nginx": "nginx", "haproxy": "HAProxy"}
    out = [f"| {who} ÷ peer | " + " | ".join(f"÷ {names.get(p, p)}" for p in peers) + " |",
           "|---|" + "---:|" * len(peers)]
    for label, k in rows:
        cells = [ratio(c.get(k), s[p].get(k)) if p != "direct" or k in ("rps", "p50", "p99", "p999") else "—"
                 for p in peers]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append(f"| rounds in which {who}'s p99 was the lower | "
               + " | ".join(wins_text(lat, who, p) if p != "direct" else "—" for p in peers) + " |")
    return "\n".join(out)


RESAMPLES = 2000


def by_round(rows, key):
    """{target: {round: value}} of one column."""
    out = {}
    for r in rows:
        out.setdefault(r["target"], {})[r["round"]] = float(r[key])
    return out


def paired(rows, key, who, peer):
    """who ÷ peer in each round that measured both: (median ratio, 95% interval or None, rounds),
    or None without such a round. The interval is a percentile bootstrap of the median: the
    per-round ratios resampled with replacement. Pairing by round cancels what a round shares
    (a slow minute of the machine is slow for every target of that round)."""
    v = by_round(rows, key)
    if who not in v or peer not in v:
        return None
    ratios = [v[who][r] / v[peer][r] for r in sorted(set(v[who]) & set(v[peer])) if v[peer][r]]
    if not ratios:
        return None
    ci = None
    if len(ratios) >= 3:
        rng = random.Random(7)
        meds = sorted(statistics.median(rng.choice(ratios) for _ in ratios) for _ in range(RESAMPLES))
        ci = meds[int(0.025 * RESAMPLES)], meds[int(0.975 * RESAMPLES) - 1]
    return statistics.median(ratios), ci, len(ratios)


def settled(ci, higher_is_better):
    """What an interval says about a target of `ratio ≥ 1` (or `≤ 1` when lower is better)."""
    if ci is None:
        return "too few rounds to tell noise from difference"
    lo, hi = ci
    good, bad = (lo >= 1, hi < 1) if higher_is_better else (hi <= 1, lo > 1)
    verdict = ("met beyond the round-to-round noise" if good
               else "missed beyond the round-to-round noise" if bad
               else "within the round-to-round noise")
    return f"95% interval {lo:.2f}–{hi:.2f}×, {verdict}"


PEERS = (("nginx", "nginx"), ("haproxy", "HAProxy"))


def per_round(rows, key, who, higher_is_better):
    """(met by every peer's median per-round ratio, text), or None if a peer has no pair."""
    parts, ok = [], True
    for peer, name in PEERS:
        p = paired(rows, key, who, peer)
        if p is None:
            return None
        m, ci, n = p
        ok = ok and (m >= 1 if higher_is_better else m <= 1)
        parts.append(f"÷ {name} {m:.2f}× over {n} rounds ({settled(ci, higher_is_better)})")
    return ok, "per round: " + "; ".join(parts)


def targets_check(s, thr, lat, who="canaryd", rss_target=True):
    """PASS/FAIL lines for the targets. Throughput and p99 are judged on the median of the
    per-round ratios to each peer; the medians over rounds are shown too. The 20 MiB peak RSS
    is a target of the HTTP/1.1 modes (`rss_target`); over HTTP/2 the peak is only reported,
    memory there being judged under many connections and streams (h2memory.sh)."""
    c, n, h = s[who], s["nginx"], s["haproxy"]
    lines = []

    def line(ok, text):
        lines.append(f"- {'PASS' if ok else 'FAIL'} ({who}): {text}")

    pr = per_round(thr, "rps", who, True)
    if pr and c.get("rps") and n.get("rps") and h.get("rps"):
        line(pr[0], f"throughput ≥ the better of nginx and HAProxy: medians {c['rps']:,.0f} vs nginx "
             f"{n['rps']:,.0f} and HAProxy {h['rps']:,.0f} req/s; {pr[1]}")
    pr = per_round(lat, "p99_ms", who, False)
    if pr and c.get("p99") is not None and n.get("p99") is not None and h.get("p99") is not None:
        line(pr[0], f"p99 at the fixed rate no worse than theirs: medians {c['p99']:.3f} ms vs nginx "
             f"{n['p99']:.3f} ms and HAProxy {h['p99']:.3f} ms; {pr[1]}")
    if c.get("hwm") is not None:
        if rss_target:
            line(c["hwm"] < 20, f"peak RSS under 20 MiB: {c['hwm']:.1f} MiB")
        else:
            lines.append(f"- reported ({who}): peak RSS {c['hwm']:.1f} MiB (no target in this "
                         "mode: HTTP/2 memory is judged under 1,000 connections × 100 streams, "
                         "benches/load/h2memory.sh)")
    return "\n".join(lines)


def raw_tables(thr, lat):
    out = ["| round | target | requests | req/s | errors | proxy CPU s | proxy cores busy | peak RSS MiB | upstream cores | generator cores | others' cores |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in thr:
        sec = float(r["seconds"])
        direct = r["target"] == "direct"
        cpu = "—" if direct else r["cpu_s"]
        cores = "—" if direct else "%.2f" % (float(r["cpu_s"]) / sec)
        hwm = "—" if direct else "%.1f" % (int(r["hwm_kib"]) / MIB)
        out.append(
            f"| {r['round']} | {r['target']} | {int(r['requests']):,} | {float(r['rps']):,.0f} | {r['errors']} | "
            f"{cpu} | {cores} | {hwm} | {float(r['upstream_cpu_s']) / sec:.2f} | "
            f"{float(r['gen_cpu_s']) / sec:.2f} | {float(r['foreign_cpu_s']) / sec:.2f} |"
        )
    out += ["", "| round | target | rate | responses | p50 ms | p99 ms | p99.9 ms | non-2xx | missing | proxy CPU s | RSS MiB | oha cores | others' cores |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in lat:
        direct = r["target"] == "direct"
        cpu = "—" if direct else r["cpu_s"]
        rss = "—" if direct else "%.1f" % (int(r["rss_kib"]) / MIB)
        out.append(
            f"| {r['round']} | {r['target']} | {r['rate']} | {int(r['responses']):,} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r['p999_ms']} | {r['non2xx']} | {r['missing']} | {cpu} | {rss} | "
            f"{float(r['gen_cpu_s']) / float(r['seconds']):.2f} | {float(r['foreign_cpu_s']) / float(r['seconds']):.2f} |"
        )
    return "\n".join(out)


def noise(thr, lat):
    """A note on phases during which other processes on the machine used CPU."""
    busy = []
    for kind, rows in (("saturation", thr), ("fixed rate", lat)):
        for r in rows:
            cores = float(r["foreign_cpu_s"]) / float(r["seconds"])
            if cores >= 0.1:
                busy.append(f"{kind} round {r['round']} {r['target']} ({cores:.2f} cores)")
    if not busy:
        return "Other processes on the machine used under 0.1 core during every measured phase."
    return ("Other processes on the machine used 0.1 core or more during: " + ", ".join(busy)
            + ". Those rounds may be low; the medians dampen single disturbed rounds.")


def base_section(s, lat, versions):
    """canaryd against canaryd-base (compare.sh --against), when it was measured."""
    if "canaryd-base" not in s:
        return ""
    prefix = "- canaryd-base: "
    base = next((l[len(prefix):] for l in versions.splitlines() if l.startswith(prefix)),
                "an earlier revision")
    return f"""## canaryd against the base revision

`canaryd-base` is {base}, measured in the same rounds as this tree.

{peer_table(s, lat, "canaryd", ("canaryd-base",))}

"""


def pgo_note(variants):
    if "canaryd-pgo" not in variants:
        return ""
    return ("`canaryd` is `cargo build --release`; `canaryd-pgo` is the same commit built by "
            "`benches/load/pgo.sh` (profile-guided optimisation, trained on this load).\n")


# compare.sh --proto: the title's suffix, the protocol note of the setup, the oha command of
# the fixed-rate phase and how the saturation phase's transport is described.
PROTOCOLS = {
    "h1": {
        "title": "",
        "note": "",
        "oha": "`oha --latency-correction`",
        "over": "",
    },
    "h1tls": {
        "title": " over HTTPS (TLS 1.3, HTTP/1.1)",
        "note": (
            "- HTTPS from the clients: TLS 1.3 carrying HTTP/1.1 (canaryd `tls_cert`/`tls_key`, rustls;\n"
            "  nginx `listen ... ssl` and HAProxy `bind ... ssl crt ... alpn http/1.1`, both OpenSSL), one\n"
            "  self-signed ECDSA P-256 certificate for all three, not verified by the clients; HTTP/1.1\n"
            "  to the upstreams. Connections are kept alive, so each handshakes once per phase. No direct\n"
            "  target: the upstreams are plain HTTP. The split check speaks HTTP/1.1 over TLS to the\n"
            "  measured port.\n"
        ),
        "oha": "`oha --insecure --latency-correction` over https",
        "over": "",
    },
    "h2c": {
        "title": " over HTTP/2",
        "note": (
            "- HTTP/2 from the clients (h2c with prior knowledge: canaryd on its one port, nginx\n"
            "  `listen ... http2`, HAProxy `bind ... proto h2`), HTTP/1.1 to the upstreams. No direct\n"
            "  target: the upstreams do not speak h2c. The split check runs over HTTP/1.1 (a second\n"
            "  listener on the peers).\n"
        ),
        "oha": "`oha --http2 -p 16 --latency-correction`",
        "over": "over h2c (prior knowledge)",
    },
    "h2tls": {
        "title": " over HTTP/2 with TLS (ALPN h2)",
        "note": (
            "- HTTP/2 over TLS 1.3 from the clients, negotiated by ALPN (canaryd `tls_cert`/`tls_key`,\n"
            "  rustls; nginx `listen ... ssl http2` and HAProxy `bind ... ssl crt ... alpn h2,http/1.1`,\n"
            "  both OpenSSL), one self-signed ECDSA P-256 certificate for all three, not verified by the\n"
            "  clients; HTTP/1.1 to the upstreams. No direct target: the upstreams are plain HTTP/1.1.\n"
            "  The split check speaks HTTP/1.1 over TLS (ALPN http/1.1) to the measured port.\n"
        ),
        "oha": "`oha --http2 -p 16 --insecure --latency-correction` over https",
        "over": "over TLS 1.3 (ALPN h2)",
    },
    "h2e2e": {
        "title": " over HTTP/2 end to end",
        "note": (
            "- HTTP/2 end to end (\"gRPC-like\"): h2c with prior knowledge from the clients (canaryd on\n"
            "  its one port, nginx `listen ... http2`, HAProxy `bind ... proto h2`) **and** to the\n"
            "  upstreams, which take h2c only: canaryd `http2 = true` on both upstreams; nginx\n"
            "  `grpc_pass grpc://$arm` (`conf/nginx-proxy-grpc.conf.tmpl`: nginx's only HTTP/2 upstream\n"
            "  proxy, which carries one request at a time per kept-alive upstream connection where\n"
            "  canaryd and HAProxy multiplex streams); HAProxy `server ... proto h2`. `direct` is h2load\n"
            "  straight to the stable upstream over h2c (the ceiling). The split check runs over HTTP/1.1\n"
            "  (canaryd's one port, a second listener on the peers); the proxies still speak HTTP/2\n"
            "  upstream for it.\n"
        ),
        "oha": "`oha --http2 -p 16 --latency-correction`",
        "over": "over h2c (prior knowledge)",
    },
}


def compare(a):
    thr, lat = read_tsv(a.thr), read_tsv(a.lat)
    s = summarize(thr, lat)
    variants = [t for t in CANARYDS if t in s]
    if a.summary_only:
        print(main_table(s))
        return
    busy = ", ".join(
        f"{t} {s[t]['cores_sat']:.2f}" for t in s if s[t].get("cores_sat") is not None
    )
    up = ", ".join(f"{t} {s[t]['up_cores_sat']:.2f}" for t in s if s[t].get("up_cores_sat") is not None)
    busy_line = f"Cores busy at saturation (CPU seconds / wall seconds): proxies {busy}; upstream {up}.\n" if busy else ""
    if a.h2 and not a.proto:  # the former `--h2 FLAGS`
        a.proto, a.h2load = "h2c", a.h2
    http1 = (a.proto or "h1") in ("h1", "h1tls")
    p = PROTOCOLS[a.proto or "h1"]
    if a.latency_only:
        saturation = "- Saturation: not measured (`--latency-only`); peak RSS is from the fixed-rate phase."
    elif a.h2load:
        saturation = (f"- Saturation: `h2load -D {a.duration} {a.h2load}` {p['over']} with one\n"
                      "  stable-arm `x-user-id` (h2load sends one header set), after a 2 s warm-up.")
    else:
        https = " over https" if a.proto == "h1tls" else ""
        saturation = (f"- Saturation: `wrk -t1 -c{a.connections} -d{a.duration}s`{https} with a random `x-user-id` per request from a pool\n"
                      "  of 10,000 ids (`tools/userid.lua`), after a 2 s warm-up.")
    protocol = p["note"]
    if a.upstream == "haproxy":
        upstream = (f"- Upstream: one HAProxy ({a.workers} thread, `conf/upstream-haproxy-h2.cfg.tmpl`, `--h2-upstream haproxy`)\n"
                    "  with two h2c frontends, `stable` and `canary`, each answering `200` with a 7-byte body\n"
                    "  (`http-request return`); the same upstream for every target. Not the nginx pair of the other\n"
                    "  modes: a faster upstream, so that the proxies rather than the upstream set the ceiling.")
    else:
        h2c = " listening for h2c only (`listen ... http2`)" if a.proto == "h2e2e" else ""
        upstream = (f"- Upstream: one nginx ({a.workers} worker) with two server blocks{h2c}, `stable` and `canary`, each\n"
                    "  answering `200` with a 7-byte body; the same upstream for every target.")
    oha = p["oha"]
    md = f"""# Load comparison: canaryd vs nginx vs HAProxy{p["title"]}

Produced by `benches/load/compare.sh` (see `benches/load/README.md`). Medians of {a.rounds} rounds;
targets alternate inside each round (each round starts one target later) and every target is
started fresh for every measurement.

- Date: {a.date}
{a.machine}
{a.versions}
- Command: `{a.command.strip()}`

## Setup

{upstream}
- The split: sticky 90/10 on `x-user-id` in every proxy (canaryd: md5 bucket rule; nginx:
  `split_clients` on `$http_x_user_id`; HAProxy: `balance hdr(x-user-id)`, `hash-type consistent`,
  weights 90/10). Keep-alive to clients and to the upstream everywhere; every proxy sets
  `X-Forwarded-For/-Proto/-Host` and a response header naming the arm. canaryd runs with
  metrics and the rollback circuit on, access log off.
{protocol}- Workers: {a.workers} per proxy (canaryd `TOKIO_WORKER_THREADS={a.workers}`, nginx `worker_processes {a.workers}`,
  HAProxy `nbthread {a.workers}`); the load generator and the upstream share the 2 CPUs; nothing is pinned.
{saturation}
- Latency: a fixed {a.rate} req/s ({a.rate_note}) for {a.duration} s, {oha}
  (coordinated omission corrected), as two generators at 90% and 10% of the rate with one
  stable-arm and one canary-arm user id each ({a.oha_connections} connections); percentiles over the merged
  per-request latencies.
- CPU: utime+stime from `/proc/PID/stat`, summed over the proxy's processes (nginx master and
  workers), over the measured phase, per 10,000 requests. Peak RSS: `VmHWM` summed over the
  same processes (the larger of the saturation and fixed-rate runs).

## Results (medians)

{main_table(s)}

{busy_line}{noise(thr, lat)} Measurements retaken because other processes used ≥ 0.2 core meanwhile: {a.retries or 0}.

## canaryd relative to its peers

{chr(10).join(peer_table(s, lat, v) + chr(10) for v in variants)}
{pgo_note(variants)}
{base_section(s, lat, a.versions)}## Targets

{chr(10).join(targets_check(s, thr, lat, v, http1) for v in variants)}

Throughput and p99 are judged per round: canaryd's figure divided by the peer's in the same
round, the median of those ratios, and its 95% interval from resampling the per-round ratios with
replacement ({RESAMPLES:,} times). "Within the noise" means this run cannot tell whether the
target holds: another run of the same command may land on the other side.

## Every round

{raw_tables(thr, lat)}
"""
    with open(a.out, "w") as f:
        f.write(md)
    print(main_table(s))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--thr", required=True, help="saturation rows (TSV written by compare.sh)")
    ap.add_argument("--lat", required=True, help="fixed-rate rows (TSV written by compare.sh)")
    ap.add_argument("--out", help="the markdown report to write")
    ap.add_argument("--summary-only", action="store_true", help="print the main table only")
    ap.add_argument("--latency-only", action="store_true")
    for k in ("date", "machine", "versions", "command", "rate", "rate-note", "duration",
              "connections", "oha-connections", "rounds", "workers", "retries", "h2load"):
        ap.add_argument(f"--{k}", default="")
    ap.add_argument("--proto", default="", choices=["", *PROTOCOLS],
                    help="compare.sh --proto: the protocols the clients and the proxies spoke")
    ap.add_argument("--h2", default="", help="former spelling of --proto h2c --h2load FLAGS")
    ap.add_argument("--upstream", default="nginx", choices=["nginx", "haproxy"],
                    help="the upstream pair (compare.sh --h2-upstream)")
    compare(ap.parse_args())


if __name__ == "__main__":
    sys.exit(main())
