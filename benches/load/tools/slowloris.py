#!/usr/bin/env python3
"""Holds idle and slowloris connections open against a loopback port (reliability.sh).

usage: slowloris.py --port PORT --idle N --slow M --duration S [--interval S] [--out JSON]

N connections connect and send nothing; M connections send a request line and then one
header line every --interval seconds, never finishing the head. A connection the server
closes is counted and opened again, so the pressure stays for the whole duration. Writes a
JSON summary: opened, closed_by_server (closed_idle + closed_slow), connect_failures,
max_open, and open_samples (the
number open at 25/50/75/95% of the duration).
"""
import argparse
import asyncio
import json
import time


class Stats:
    opened = closed_by_server = connect_failures = open_now = max_open = 0
    closed_idle = closed_slow = 0


async def holder(port, slow, interval, end, st):
    while time.time() < end:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            st.connect_failures += 1
            await asyncio.sleep(0.2)
            continue
        st.opened += 1
        st.open_now += 1
        st.max_open = max(st.max_open, st.open_now)
        closed = False
        try:
            if slow:
                writer.write(b"GET / HTTP/1.1\r\nhost: slow.local\r\n")
                await writer.drain()
            n = 0
            while time.time() < end:
                # a read that returns means the server closed (or answered: also an end)
                try:
                    data = await asyncio.wait_for(reader.read(4096), min(interval, max(0.01, end - time.time())))
                    if not data:
                        closed = True
                        break
                except asyncio.TimeoutError:
                    pass
                if slow and time.time() < end:
                    n += 1
                    writer.write(b"x-slow-%d: %d\r\n" % (n, n))
                    await writer.drain()
        except (ConnectionError, OSError):
            closed = True
        finally:
            st.open_now -= 1
            if closed:
                st.closed_by_server += 1
                if slow:
                    st.closed_slow += 1
                else:
                    st.closed_idle += 1
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--idle", type=int, default=250)
    ap.add_argument("--slow", type=int, default=250)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--out")
    a = ap.parse_args()
    st = Stats()
    end = time.time() + a.duration
    samples = []

    async def sampler():
        for frac in (0.25, 0.5, 0.75, 0.95):
            await asyncio.sleep(max(0, end - a.duration * (1 - frac) - time.time()))
            samples.append(st.open_now)

    tasks = [sampler()]
    tasks += [holder(a.port, False, a.interval, end, st) for _ in range(a.idle)]
    tasks += [holder(a.port, True, a.interval, end, st) for _ in range(a.slow)]
    await asyncio.gather(*tasks)
    out = {
        "idle": a.idle, "slow": a.slow, "opened": st.opened,
        "closed_by_server": st.closed_by_server, "closed_idle": st.closed_idle,
        "closed_slow": st.closed_slow, "connect_failures": st.connect_failures,
        "max_open": st.max_open, "open_samples": samples,
    }
    text = json.dumps(out)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text, flush=True)


if __name__ == "__main__":
    asyncio.run(main())
