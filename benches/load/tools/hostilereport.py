#!/usr/bin/env python3
"""Turns hostile.sh's flood.tsv and mem.tsv into the markdown of benches/load/HOSTILE.md.

CPU per MB: the median over rounds of each target's proxy CPU seconds per MB (10^6 bytes) of
request body on the wire (chunk size lines, data and CRLFs, as the client sent them); the
ratio canaryd ÷ nginx is the ratio of medians, and beside it the median of the per-round
ratios. Memory: one measurement per variant and target.
With --summary-only, prints the two summary tables (smoke mode).
"""
import argparse
import statistics

TARGETS = ["canaryd", "nginx"]
MB = 1e6
MIB = 1024.0


def read_tsv(path):
    try:
        lines = [l.rstrip("\n").split("\t") for l in open(path)]
    except FileNotFoundError:
        return []
    if not lines:
        return []
    return [dict(zip(lines[0], l)) for l in lines[1:] if l and l[0]]


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, digits=1):
    return "—" if v is None else f"{v:,.{digits}f}"


def ratio(a, b):
    """a ÷ b to 3 significant digits (0.00412×, 0.85×, 257×)."""
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.3g}×"


def f(r, k):
    return float(r[k])


def others(r):
    """Cores used by other processes on the machine during the measurement."""
    return f(r, "foreign_cpu_s") / f(r, "foreign_seconds")


def cpu_per_mb(r):
    return f(r, "proxy_cpu_s") / (f(r, "wire_bytes") / MB) if f(r, "wire_bytes") else None


def flood_summary(rows):
    s = {}
    for t in TARGETS:
        rs = [r for r in rows if r["target"] == t]
        if not rs:
            continue
        per = [cpu_per_mb(r) for r in rs]
        s[t] = {
            "n": len(rs),
            "cpu_mb": med(per),
            "cpu_mb_min": min(p for p in per if p is not None) if any(p is not None for p in per) else None,
            "cpu_mb_max": max(p for p in per if p is not None) if any(p is not None for p in per) else None,
            "mbps": med(f(r, "wire_bytes") / MB / f(r, "seconds") for r in rs),
            "cores": med(f(r, "proxy_cpu_s") / f(r, "seconds") for r in rs),
            "up_cpu_mb": med(f(r, "upstream_cpu_s") / (f(r, "wire_bytes") / MB) for r in rs if f(r, "wire_bytes")),
            "up_cores": med(f(r, "upstream_cpu_s") / f(r, "seconds") for r in rs),
            "up_chunk_bytes": med(f(r, "up_body_bytes") / f(r, "up_chunks") for r in rs if f(r, "up_chunks")),
            "up_wire_per_wire": med(f(r, "up_wire_bytes") / f(r, "wire_bytes") for r in rs if f(r, "wire_bytes")),
            "body_whole": all(int(r["up_body_bytes"]) == int(r["data_bytes"]) for r in rs),
            "hwm": med(f(r, "proxy_hwm_kib") / MIB for r in rs),
        }
    return s


def per_round_ratio(rows):
    by = {}
    for r in rows:
        by.setdefault(r["round"], {})[r["target"]] = cpu_per_mb(r)
    rs = [v["canaryd"] / v["nginx"] for v in by.values()
          if v.get("canaryd") is not None and v.get("nginx")]
    return med(rs), len(rs)


def flood_table(rows):
    s = flood_summary(rows)
    ts = [t for t in TARGETS if t in s]
    out = ["| | " + " | ".join(ts) + (" | canaryd ÷ nginx |" if len(ts) == 2 else " |"),
           "|---|" + "---|" * len(ts) + ("---|" if len(ts) == 2 else "")]

    def row(label, key, digits, with_ratio=True):
        cells = [fmt(s[t][key], digits) for t in ts]
        extra = ""
        if len(ts) == 2:
            extra = " " + (ratio(s["canaryd"][key], s["nginx"][key]) if with_ratio else "") + " |"
        out.append(f"| {label} | " + " | ".join(cells) + " |" + extra)

    row("**proxy CPU s per MB of wire body** (median)", "cpu_mb", 4)
    out.append("| … lowest – highest round | " + " | ".join(
        f"{fmt(s[t]['cpu_mb_min'], 4)} – {fmt(s[t]['cpu_mb_max'], 4)}" for t in ts) + " |"
        + (" |" if len(ts) == 2 else ""))
    if len(ts) == 2:
        m, n = per_round_ratio(rows)
        out.append(f"| … canaryd ÷ nginx per round (median of {n}) | | | {ratio(m, 1) if m else '—'} |")
    row("wire body MB/s through the proxy", "mbps", 1)
    row("proxy cores busy", "cores", 2)
    row("peak RSS of the proxy, MiB", "hwm", 1)
    row("upstream CPU s per MB of wire body", "up_cpu_mb", 4)
    row("upstream cores busy", "up_cores", 2)
    row("mean chunk size reaching the upstream, bytes", "up_chunk_bytes", 1)
    row("wire bytes to the upstream per wire byte from the client", "up_wire_per_wire", 3)
    out.append("| body reached the upstream whole | " + " | ".join(
        "yes" if s[t]["body_whole"] else "**NO**" for t in ts) + " |" + (" |" if len(ts) == 2 else ""))
    return out


def flood_rounds(rows):
    out = ["| round | target | wire MB | seconds | MB/s | proxy CPU s | CPU s / MB | proxy cores | "
           "upstream CPU s | client CPU s | others' cores | chunks at the upstream | peak RSS MiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w = f(r, "wire_bytes") / MB
        sec = f(r, "seconds")
        out.append(f"| {r['round']} | {r['target']} | {w:,.1f} | {sec:.1f} | {w / sec:,.1f} | "
                   f"{f(r, 'proxy_cpu_s'):.2f} | {fmt(cpu_per_mb(r), 4)} | {f(r, 'proxy_cpu_s') / sec:.2f} | "
                   f"{f(r, 'upstream_cpu_s'):.2f} | {f(r, 'client_cpu_s'):.2f} | "
                   f"{others(r):.2f} | {int(r['up_chunks']):,} | "
                   f"{f(r, 'proxy_hwm_kib') / MIB:.1f} |")
    return out


def mem_table(rows):
    out = ["| variant | head sent per connection | target | connections held | RSS before, MiB | "
           "RSS holding them, MiB | KiB per connection | peak RSS, MiB | unread by the proxy, KiB | "
           "seconds until all were open and had sent it |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = int(r["conns"])
        held = int(r["open_at_ready"])
        held_txt = f"{held:,}" + ("" if held == n and int(r["established"]) >= n
                                  else f" of {n:,} (**not all**; {int(r['established']):,} established at the proxy)")
        out.append(f"| {r['variant']} | {int(r['head_bytes']):,} B | {r['target']} | {held_txt} | "
                   f"{f(r, 'idle_rss_kib') / MIB:,.1f} | {f(r, 'rss_kib') / MIB:,.1f} | "
                   f"{(f(r, 'rss_kib') - f(r, 'idle_rss_kib')) / n:,.1f} | {f(r, 'hwm_kib') / MIB:,.1f} | "
                   f"{f(r, 'recvq_bytes') / 1024:,.1f} | {f(r, 'seconds_to_ready'):.1f} |")
    variants = []
    for r in rows:
        if r["variant"] not in variants:
            variants.append(r["variant"])
    ratios = []
    for v in variants:
        by = {r["target"]: r for r in rows if r["variant"] == v}
        if "canaryd" in by and "nginx" in by:
            c, g = by["canaryd"], by["nginx"]
            pc = (f(c, "rss_kib") - f(c, "idle_rss_kib")) / int(c["conns"])
            pg = (f(g, "rss_kib") - f(g, "idle_rss_kib")) / int(g["conns"])
            ratios.append(f"- `{v}`: canaryd ÷ nginx, RSS holding the connections "
                          f"{ratio(f(c, 'rss_kib'), f(g, 'rss_kib'))}, per connection {ratio(pc, pg)}")
    return out, ratios


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--flood", required=True)
    ap.add_argument("--mem", required=True)
    ap.add_argument("--out")
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--failed", action="append", default=[])
    for k in ("date", "machine", "versions", "command", "conns", "duration", "rounds", "slow",
              "lines", "line-bytes", "big-bytes", "retries"):
        ap.add_argument(f"--{k}", default="")
    a = ap.parse_args()
    flood = read_tsv(a.flood)
    mem = read_tsv(a.mem)
    mt, ratios = mem_table(mem)

    if a.summary_only:
        print("\n".join(["CPU per MB of 1-byte-chunk request body:"] + flood_table(flood)
                        + ["", "Memory with slowloris heads:"] + mt + ratios))
        return

    L = ["# Hostile clients: canaryd vs nginx", "",
         "Written by `benches/load/hostile.sh` (see README.md there); overwritten by every run.", "",
         f"- Date: {a.date}", f"- Command: `{a.command}`"]
    L += a.machine.splitlines() + a.versions.splitlines()
    L += ["- Upstream of both proxies: `tools/sink.py` (Python asyncio; reads a body of any framing "
          "and answers 200 only when it is whole)"]
    if a.failed:
        L += ["", "## Problems in this run", ""] + [f"- {x}" for x in a.failed]
    L += ["", "## 1. CPU per MB of a request body made of 1-byte chunks", "",
          f"`tools/chunkflood.py`: {a.conns} connections, each `POST /upload` with "
          "`Transfer-Encoding: chunked` and a body of `1\\r\\nX\\r\\n` chunks only (6 wire bytes per "
          f"byte of data), written 64 KiB at a time as fast as the socket takes them for {a.duration} s, "
          "then `0\\r\\n\\r\\n` and the response (200 from the upstream once it has the whole body). "
          "CPU = utime+stime of the proxy's processes and threads (`/proc/PID/stat`) from before the "
          "client connects until it has every response. MB = 10^6 bytes of body as the client "
          "wrote it on the wire. Each measurement starts the proxy fresh; "
          f"{a.rounds} round(s), targets alternating, each round starting with the other one.", ""]
    L += flood_table(flood)
    L += ["", "Below 1× is better for canaryd in the CPU rows. The upstream rows show what each proxy "
          "forwards: the mean size of the chunks the upstream received, and the wire bytes it "
          "received per wire byte the client sent.", "", "### Every round", ""]
    L += flood_rounds(flood)
    if a.retries and a.retries != "0":
        L += ["", f"{a.retries} measurement(s) were taken again because other processes on the "
              "machine used 0.2 core or more during them."]
    busy = [r for r in flood if others(r) >= 0.2]
    if busy:
        L += ["", f"**{len(busy)} of {len(flood)} measurements ran while other processes used 0.2 "
              "core or more** (`others' cores`; the wait for a quiet machine, `--quiet-wait`, ran "
              "out): the proxy, the client and the upstream then shared the CPUs with them, which "
              "lowers MB/s and can raise CPU per MB."]
    L += ["", "## 2. Memory with slowloris heads", "",
          f"`tools/slowheads.py`: {a.slow} connections, each holding a request head that is never "
          "finished. Variant `lines`: `GET / HTTP/1.1`, `Host: a`, then one "
          f"`x-a: aaa…` line of {a.line_bytes} bytes a second, {a.lines} in all. Variant `big`: "
          f"a {a.big_bytes}-byte head (lines of 1,000 bytes, under 100 fields) sent at once. "
          "The proxy is started fresh for each; RSS before = VmRSS (summed over nginx's master and "
          "worker) after one request; RSS holding them = VmRSS one second after every connection "
          "was open and had sent everything (send buffers empty). KiB per connection = the "
          "difference ÷ the connections. canaryd: `header_read_timeout = \"60s\"`, "
          "`max_connections = 20000`; nginx: `client_header_timeout 60s`, "
          "`large_client_header_buffers 10 8k` (a 60 KB head must fit; canaryd's limit is its "
          "default 64 KiB). \"Unread by the proxy\" is the sum of the receive queues of its "
          "client sockets at the sample (bytes the kernel holds that the proxy has not read).", ""]
    L += mt + [""] + ratios
    text = "\n".join(L) + "\n"
    with open(a.out, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
