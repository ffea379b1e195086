#!/usr/bin/env python3
"""A small HTTP/1.1 upstream for reliability.sh (Python stdlib, asyncio).

usage: upstream.py --port PORT --name NAME [--delay-ms N]

Answers every request with 200, body "NAME\\n" and header "x-arm: NAME", keeping connections
alive. Reads and discards request bodies (Content-Length or chunked). "?sleep_ms=N" in the
path delays the answer by N ms (to have requests in flight when the proxy is stopped);
--delay-ms delays every answer (a slow shadow for compare.sh --shadow).
Loopback only. Stops on SIGTERM/SIGINT.
"""
import argparse
import asyncio
import signal


async def read_body(reader, headers):
    te = headers.get("transfer-encoding", "")
    if "chunked" in te.lower():
        while True:
            line = await reader.readline()
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                # trailers until the empty line
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return
            await reader.readexactly(size + 2)
    n = int(headers.get("content-length", "0") or 0)
    if n:
        await reader.readexactly(n)


async def handle(reader, writer, name, delay_ms=0):
    body = (name + "\n").encode()
    head = (
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-arm: %s\r\ncontent-length: %d\r\n\r\n"
        % (name, len(body))
    ).encode()
    try:
        while True:
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = raw.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) < 3:
                return
            target = parts[1]
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            await read_body(reader, headers)
            if delay_ms:
                await asyncio.sleep(delay_ms / 1000)
            if "sleep_ms=" in target:
                try:
                    ms = int(target.split("sleep_ms=", 1)[1].split("&", 1)[0])
                    await asyncio.sleep(ms / 1000)
                except ValueError:
                    pass
            writer.write(head + body)
            await writer.drain()
            if headers.get("connection", "").lower() == "close":
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        try:
            writer.close()
        except Exception:  # noqa: BLE001
            pass


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--delay-ms", type=int, default=0, help="delay every answer by this much")
    a = ap.parse_args()
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, a.name, a.delay_ms), "127.0.0.1", a.port, backlog=1024, reuse_address=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    print(f"upstream {a.name} listening on 127.0.0.1:{a.port}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
