#!/usr/bin/env python3
"""Many connections holding an unfinished request head open, to measure a proxy's memory
per connection (hostile.sh).

usage: slowheads.py --port PORT --conns N --mode lines|big [--lines 5] [--line-bytes 100]
                    [--big-bytes 60000] [--interval 1] --ready-file F --stop-file F [--out JSON]

--mode lines: each connection sends `GET / HTTP/1.1\\r\\nHost: a\\r\\n`, then one
  `x-a: aaa...\\r\\n` line of --line-bytes bytes every --interval seconds, --lines lines in
  all, and then nothing more (the head is never finished).
--mode big: each connection sends a head of --big-bytes bytes at once (request line, Host and
  lines `x-aNN: aaa...\\r\\n` of 1,000 bytes, under 100 header fields), never finished.

Connections are opened with at most --open-concurrency connects in flight (so the listen
backlog is not overrun) and are not reopened. When every connection is open and has sent
everything it will send (and the send buffers are empty, so the kernel holds the bytes), the
JSON summary so far is written to --ready-file; the connections then stay open until
--stop-file exists (or --hold-max seconds pass), and the final summary goes to --out and
stdout: conns, opened, connect_failures, closed_by_server (before the stop), open_at_ready,
head_bytes (per connection), seconds to open them all. Raises its own open-file limit to the
hard limit and exits 2 at once if that is below --conns + 64.
"""
import argparse
import asyncio
import json
import os
import resource
import time


class St:
    opened = connect_failures = closed_by_server = done_sending = 0
    first_error = None


async def hold(i, a, st, sem, stop, head_start, lines):
    async with sem:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
        except OSError as e:
            st.connect_failures += 1
            st.first_error = st.first_error or repr(e)
            st.done_sending += 1
            return
    st.opened += 1
    closed = asyncio.Event()

    async def watch():
        try:
            while await reader.read(65536):
                pass  # an answer (400, 408, 431 ...) is an end too; wait for the close
        except (ConnectionError, OSError):
            pass
        closed.set()

    watcher = asyncio.create_task(watch())
    try:
        writer.write(head_start)
        await writer.drain()
        for _ in range(lines):
            try:
                await asyncio.wait_for(closed.wait(), a.interval)
                break
            except asyncio.TimeoutError:
                pass
            writer.write(a.line)
            await writer.drain()
        # everything handed to the kernel
        while writer.transport.get_write_buffer_size() and not closed.is_set():
            await asyncio.sleep(0.05)
    except (ConnectionError, OSError):
        closed.set()
    st.done_sending += 1
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([watcher, stopper], return_when=asyncio.FIRST_COMPLETED)
    if closed.is_set() and not stop.is_set():
        st.closed_by_server += 1
    watcher.cancel()
    stopper.cancel()
    try:
        writer.transport.abort() if a.abort else writer.close()
    except Exception:  # noqa: BLE001
        pass


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--conns", type=int, required=True)
    ap.add_argument("--mode", choices=("lines", "big"), required=True)
    ap.add_argument("--lines", type=int, default=5)
    ap.add_argument("--line-bytes", type=int, default=100)
    ap.add_argument("--big-bytes", type=int, default=60000)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--open-concurrency", type=int, default=256)
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--stop-file", required=True)
    ap.add_argument("--hold-max", type=float, default=120)
    ap.add_argument("--abort", action="store_true", help="close with RST instead of FIN")
    ap.add_argument("--out")
    a = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = a.conns + 64
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            print(json.dumps({"error": f"open-file limit {hard} < {want} (raise ulimit -n)"}), flush=True)
            raise SystemExit(2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else hard, hard))

    start = b"GET / HTTP/1.1\r\nHost: a\r\n"
    if a.mode == "lines":
        a.line = b"x-a: " + b"a" * (a.line_bytes - 7) + b"\r\n"
        head_start, lines = start, a.lines
        head_bytes = len(start) + a.lines * len(a.line)
    else:
        body, n = [start], len(start)
        k = 0
        while n < a.big_bytes:
            k += 1
            name = b"x-a%d: " % k
            size = min(1000, a.big_bytes - n)
            line = name + b"a" * max(1, size - len(name) - 2) + b"\r\n"
            body.append(line)
            n += len(line)
        head_start, lines = b"".join(body), 0
        head_bytes = len(head_start)
        a.line = b""

    st = St()
    stop = asyncio.Event()
    sem = asyncio.Semaphore(a.open_concurrency)
    t0 = time.monotonic()
    tasks = [asyncio.create_task(hold(i, a, st, sem, stop, head_start, lines)) for i in range(a.conns)]

    def summary():
        return {"mode": a.mode, "conns": a.conns, "opened": st.opened,
                "connect_failures": st.connect_failures, "closed_by_server": st.closed_by_server,
                "open_now": st.opened - st.closed_by_server, "head_bytes": head_bytes,
                "first_error": st.first_error}

    while st.done_sending < a.conns:
        await asyncio.sleep(0.1)
    ready = summary()
    ready["seconds_to_ready"] = round(time.monotonic() - t0, 3)
    with open(a.ready_file + ".tmp", "w") as f:
        json.dump(ready, f)
    os.rename(a.ready_file + ".tmp", a.ready_file)
    t_ready = time.monotonic()
    while not os.path.exists(a.stop_file) and time.monotonic() - t_ready < a.hold_max:
        await asyncio.sleep(0.1)
    final = summary()
    final.update(seconds_to_ready=ready["seconds_to_ready"], open_at_ready=ready["open_now"],
                 held_seconds=round(time.monotonic() - t_ready, 3))
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    text = json.dumps(final)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text, flush=True)


if __name__ == "__main__":
    asyncio.run(main())
