#!/usr/bin/env python3
"""A request body made only of 1-byte chunks, as fast as the socket takes it (hostile.sh).

usage: chunkflood.py --port PORT [--conns 4] [--duration 10] [--write-bytes 65536]
                     [--sndbuf 262144] [--out JSON]

Opens --conns connections to 127.0.0.1:PORT; on each sends
`POST /upload HTTP/1.1` with `Transfer-Encoding: chunked`, then a body of `1\\r\\nX\\r\\n`
chunks written in blocks of --write-bytes pre-built bytes (one send call each, blocking, one
thread per connection) for --duration seconds, then the last chunk `0\\r\\n\\r\\n`, and reads
the response. The flood starts on all connections together, once every one has sent its head.
Each socket's send buffer is fixed (--sndbuf; the kernel doubles it) instead of autotuned (up
to 4 MiB), so a slow proxy does not leave megabytes queued in the client when the time is up.

Prints (and writes to --out) a JSON summary: wire bytes of body sent (every chunk's size line,
data and CRLF, and the last chunk), data bytes (one per chunk), seconds from the start of the
flood to the last response, the status of each response, errors, and this process's own CPU
seconds. Exit status 1 if a connection failed or a response was not 200.
"""
import argparse
import json
import resource
import socket
import threading
import time

CHUNK = b"1\r\nX\r\n"
LAST = b"0\r\n\r\n"


def read_response(sock):
    """Reads one response (head + Content-Length or chunked body); returns its status."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        if not got:
            raise ConnectionError(f"connection closed before a response head ({len(data)} bytes)")
        data += got
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    length = 0
    chunked = False
    for line in lines[1:]:
        k, _, v = line.partition(":")
        k = k.strip().lower()
        if k == "content-length":
            length = int(v)
        elif k == "transfer-encoding" and "chunked" in v.lower():
            chunked = True
    if chunked:
        while not rest.endswith(b"0\r\n\r\n"):
            got = sock.recv(65536)
            if not got:
                break
            rest += got
    else:
        while len(rest) < length:
            got = sock.recv(65536)
            if not got:
                break
            rest += got
    return status


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--write-bytes", type=int, default=65536)
    ap.add_argument("--timeout", type=float, default=60, help="per socket operation")
    ap.add_argument("--sndbuf", type=int, default=256 * 1024,
                    help="SO_SNDBUF of each connection (0: the kernel's autotuning)")
    ap.add_argument("--out")
    a = ap.parse_args()

    block = CHUNK * max(1, a.write_bytes // len(CHUNK))
    head = (b"POST /upload HTTP/1.1\r\nhost: bench.local\r\ntransfer-encoding: chunked\r\n"
            b"content-type: application/octet-stream\r\nx-user-id: flood\r\n\r\n")
    results = [dict(wire=0, status=None, error=None) for _ in range(a.conns)]
    times = {}

    def start():  # run by one thread when all have arrived, before any is released
        times["t0"] = time.monotonic()
        times["end"] = times["t0"] + a.duration

    ready = threading.Barrier(a.conns + 1, action=start)

    def conn(i):
        r = results[i]
        sock = None
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if a.sndbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, a.sndbuf)
            sock.settimeout(a.timeout)
            sock.connect(("127.0.0.1", a.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(head)
        except OSError as e:
            r["error"] = f"connect/head: {e}"
        try:
            ready.wait(a.timeout)
        except threading.BrokenBarrierError:
            r["error"] = r["error"] or "start barrier broken"
        if r["error"]:
            if sock:
                sock.close()
            return
        try:
            end = times["end"]
            while time.monotonic() < end:
                sock.sendall(block)
                r["wire"] += len(block)
            sock.sendall(LAST)
            r["wire"] += len(LAST)
            r["status"] = read_response(sock)
        except (OSError, ValueError, IndexError) as e:
            r["error"] = f"after {r['wire']} body bytes: {e}"
        finally:
            sock.close()

    threads = [threading.Thread(target=conn, args=(i,), daemon=True) for i in range(a.conns)]
    for t in threads:
        t.start()
    try:
        ready.wait(a.timeout)
    except threading.BrokenBarrierError:
        pass
    t0 = times.get("t0", time.monotonic())
    for t in threads:
        t.join(a.duration + 3 * a.timeout)
    t1 = time.monotonic()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    wire = sum(r["wire"] for r in results)
    data_bytes = sum((r["wire"] - len(LAST)) // len(CHUNK) for r in results if r["wire"] >= len(LAST))
    errors = [f"conn {i}: {r['error']}" for i, r in enumerate(results) if r["error"]]
    errors += [f"conn {i}: status {r['status']}" for i, r in enumerate(results)
               if r["error"] is None and r["status"] != 200]
    out = {
        "conns": a.conns, "duration_s": a.duration, "seconds": round(t1 - t0, 3),
        "wire_bytes": wire, "data_bytes": data_bytes, "write_bytes": len(block),
        "statuses": [r["status"] for r in results], "errors": errors,
        "client_cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
    }
    text = json.dumps(out)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text, flush=True)
    raise SystemExit(1 if errors else 0)


if __name__ == "__main__":
    main()
