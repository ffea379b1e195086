#!/usr/bin/env python3
"""Paced HTTP/1.1 load for reliability.sh (Python stdlib, asyncio), one CSV row per request.

usage: loadclient.py --url URL --out CSV [--connections N] [--rate R] [--duration S]
                     [--stop-file F] [--post-share P] [--path PATH] [--timeout S]

N keep-alive connections share R requests/s (each connection sends on its own fixed schedule;
latency is measured from the scheduled send time, so a stall is not hidden by the client
waiting: coordinated omission is corrected). Every request carries x-user-id drawn at random
from user1..user10000; a share P of them are POSTs with a 64-byte body (POSTs cannot fail
over to another arm). Stops after S seconds or when F exists; requests in flight then are
waited for (up to --timeout).

CSV columns:
  t_sched,t_send,t_end   epoch seconds: scheduled send, actual send, end
  method                 GET or POST
  uid,bucket             the user id and its design bucket: (h%100)*100 + (h//100)%100, h=md5(uid)
  status                 HTTP status, 0 when no response came
  arm                    x-canaryd-upstream of the response ("" if absent)
  body                   the upstream that really answered (its body), "" if none
  err                    "" or: connect (refused/unreachable), closed-idle (the connection
                         closed before any byte of the response: a keep-alive close race),
                         reset, timeout, protocol
"""
import argparse
import asyncio
import hashlib
import os
import random
import time
import urllib.parse

POOL = 10000
BODY = b"x" * 64


def bucket(uid):
    h = int(hashlib.md5(uid.encode()).hexdigest(), 16)
    return (h % 100) * 100 + (h // 100) % 100


class Conn:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def ensure(self):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self):
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001
                pass
        self.reader = self.writer = None


async def one_request(conn, method, path, uid):
    """Returns (status, arm, body, err)."""
    try:
        await conn.ensure()
    except OSError:
        conn.close()
        return 0, "", "", "connect"
    if method == "POST":
        req = (f"POST {path} HTTP/1.1\r\nhost: bench.local\r\nx-user-id: {uid}\r\n"
               f"content-type: application/octet-stream\r\ncontent-length: {len(BODY)}\r\n\r\n").encode() + BODY
    else:
        req = f"GET {path} HTTP/1.1\r\nhost: bench.local\r\nx-user-id: {uid}\r\n\r\n".encode()
    got_bytes = False
    try:
        conn.writer.write(req)
        await conn.writer.drain()
        head = await conn.reader.readuntil(b"\r\n\r\n")
        got_bytes = True
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        hdrs = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        if "chunked" in hdrs.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                size = int((await conn.reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (await conn.reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append((await conn.reader.readexactly(size + 2))[:-2])
            body = b"".join(chunks)
        else:
            body = await conn.reader.readexactly(int(hdrs.get("content-length", "0") or 0))
        if hdrs.get("connection", "").lower() == "close":
            conn.close()
        text = body.decode("latin-1").strip()
        served = text if text in ("stable", "canary") else ""
        return status, hdrs.get("x-canaryd-upstream", ""), served, ""
    except asyncio.IncompleteReadError as e:
        conn.close()
        return 0, "", "", ("protocol" if got_bytes or e.partial else "closed-idle")
    except ConnectionResetError:
        conn.close()
        return 0, "", "", ("protocol" if got_bytes else "reset")
    except (OSError, ValueError, IndexError):
        conn.close()
        return 0, "", "", "protocol"


async def worker(i, a, host, port, path, interval, rows, stop, buckets, rng):
    conn = Conn(host, port)
    t_next = time.time() + (interval * i / max(1, a.connections) if interval else 0)
    while not stop.is_set():
        if interval:
            delay = t_next - time.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    break
                except asyncio.TimeoutError:
                    pass
        t_sched = t_next if interval else time.time()
        uid = f"user{rng.randrange(1, POOL + 1)}"
        method = "POST" if rng.random() < a.post_share else "GET"
        t_send = time.time()
        try:
            status, arm, body, err = await asyncio.wait_for(
                one_request(conn, method, path, uid), a.timeout)
        except asyncio.TimeoutError:
            conn.close()
            status, arm, body, err = 0, "", "", "timeout"
        t_end = time.time()
        rows.append(f"{t_sched:.6f},{t_send:.6f},{t_end:.6f},{method},{uid},{buckets[uid]},"
                    f"{status},{arm},{body},{err}")
        if interval:
            t_next += interval
        elif err == "connect":
            await asyncio.sleep(0.01)  # refused: do not spin
    conn.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rate", type=float, default=1000.0, help="total req/s; 0 = as fast as possible")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--stop-file")
    ap.add_argument("--post-share", type=float, default=0.0)
    ap.add_argument("--path", default="/")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    u = urllib.parse.urlsplit(a.url)
    path = a.path
    buckets = {f"user{i}": bucket(f"user{i}") for i in range(1, POOL + 1)}
    interval = a.connections / a.rate if a.rate > 0 else 0.0
    rows = []
    stop = asyncio.Event()
    rng = random.Random(a.seed)

    async def watch():
        end = time.time() + a.duration
        while time.time() < end:
            if a.stop_file and os.path.exists(a.stop_file):
                break
            await asyncio.sleep(0.05)
        stop.set()

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(worker(i, a, u.hostname, u.port, path, interval, rows, stop, buckets,
                                  random.Random(rng.random())) for i in range(a.connections)))
    watcher.cancel()
    with open(a.out, "w") as f:
        f.write("t_sched,t_send,t_end,method,uid,bucket,status,arm,body,err\n")
        f.write("\n".join(rows))
        if rows:
            f.write("\n")
    print(f"loadclient: {len(rows)} requests written to {a.out}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
