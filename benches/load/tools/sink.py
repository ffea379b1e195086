#!/usr/bin/env python3
"""An HTTP/1.1 upstream that reads and discards request bodies of any framing (hostile.sh).

usage: sink.py --port PORT [--port PORT ...] [--stats FILE]

Every request gets 200 with the 3-byte body "ok\\n" once its whole body has arrived (by
Content-Length, chunked with or without trailers, or none), never before, so a proxy streaming
a body is measured up to its last byte. Connections are kept alive. Loopback only; stops on
SIGTERM/SIGINT.

Built to stay cheap where a proxy is slow: a body of 1-byte chunks, forwarded as 1-byte
chunks, is 6 wire bytes per byte of data, and parsing it chunk by chunk in Python (what
tools/upstream.py does: about 4 µs a chunk on the 2-core development machine) would make
the upstream the bottleneck. So this is an asyncio Protocol (no stream reader) that parses
every framing with a state machine over whole reads, and takes a run of 1-byte chunks
(`1\\r\\nX\\r\\n` ...) in one step: five strided slices of the read, each compared at C
speed. Any other chunk goes through the general parser, one Python step per chunk, cheap when
chunks are large. A body arriving in small reads (a proxy writing each chunk on its own)
pauses reading for 5 ms after each, so the next read carries more; a body arriving fast
comes in large reads and is never paused.

With --stats FILE, appends one JSON line per completed request: port, body framing, decoded
body bytes, chunks, wire bytes of the body, the request's target.
"""
import argparse
import asyncio
import json
import signal

RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n"
MAX_HEAD = 1 << 20
# Reads of a body smaller than BATCH bytes pause reading for BATCH_DELAY seconds. A body that
# arrives fast comes in large reads and never waits; one that trickles is read less often.
BATCH = 16 * 1024
BATCH_DELAY = 0.005
# states
HEAD, LENGTH, SIZE, DATA, TRAILER = range(5)
ONE_BYTE = ((0, b"1"), (1, b"\r"), (2, b"\n"), (4, b"\r"), (5, b"\n"))


class Sink(asyncio.Protocol):
    def __init__(self, port, stats):
        self.port = port
        self.stats = stats
        self.buf = b""
        self.pos = 0
        self.state = HEAD
        self.transport = None
        self.reset()

    def reset(self):
        self.remaining = 0
        self.close_after = False
        self.framing = "none"
        self.target = ""
        self.body_bytes = 0
        self.chunks = 0
        self.wire = 0

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.pos < len(self.buf):
            self.buf = self.buf[self.pos:] + data
        else:
            self.buf = data
        self.pos = 0
        try:
            self.parse()
            if self.state != HEAD and len(data) < BATCH:
                # a body arriving in small reads: let it pile up for a moment, so that each
                # read (a Python step of its own) carries more of it
                self.transport.pause_reading()
                asyncio.get_running_loop().call_later(BATCH_DELAY, self.transport.resume_reading)
        except ValueError as e:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            print(f"sink :{self.port}: bad request: {e}", flush=True)
            self.transport.close()

    def parse(self):
        buf = self.buf
        n = len(buf)
        while self.pos < n:
            pos = self.pos
            if self.state == HEAD:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    if n - pos > MAX_HEAD:
                        raise ValueError("request head too long")
                    return
                self.head(buf[pos:end].decode("latin-1"))
                self.pos = end + 4
                if self.state == HEAD:  # no body
                    self.done()
            elif self.state == LENGTH:
                take = min(self.remaining, n - pos)
                self.remaining -= take
                self.body_bytes += take
                self.wire += take
                self.pos = pos + take
                if self.remaining == 0:
                    self.state = HEAD
                    self.done()
            elif self.state == DATA:
                take = min(self.remaining, n - pos)
                self.remaining -= take
                self.wire += take
                self.pos = pos + take
                if self.remaining == 0:
                    self.state = SIZE
            elif self.state == SIZE:
                k = (n - pos) // 6
                if k >= 4 and buf.startswith(b"1\r\n", pos):
                    # a run of 1-byte chunks: the longest prefix where every 6-byte unit is
                    # "1\r\n" + any byte + "\r\n"
                    units = buf[pos:pos + 6 * k]
                    run = k
                    for off, ch in ONE_BYTE:
                        run = min(run, k - len(units[off::6].lstrip(ch)))
                        if run == 0:
                            break
                    if run:
                        self.pos = pos + 6 * run
                        self.chunks += run
                        self.body_bytes += run
                        self.wire += 6 * run
                        continue
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > 4096:
                        raise ValueError("chunk size line too long")
                    return
                size = int(buf[pos:eol].split(b";", 1)[0].strip(), 16)
                self.wire += eol + 2 - pos
                self.pos = eol + 2
                if size == 0:
                    self.state = TRAILER
                else:
                    self.chunks += 1
                    self.body_bytes += size
                    self.remaining = size + 2  # the data and its CRLF
                    self.state = DATA
            else:  # TRAILER: lines until an empty one
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > MAX_HEAD:
                        raise ValueError("trailers too long")
                    return
                self.wire += eol + 2 - pos
                self.pos = eol + 2
                if eol == pos:
                    self.state = HEAD
                    self.done()

    def head(self, text):
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise ValueError(f"bad request line {lines[0][:80]!r}")
        self.target = parts[1]
        length = None
        chunked = False
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"bad header line {line[:80]!r}")
            name = name.strip().lower()
            value = value.strip()
            if name == "transfer-encoding":
                chunked = value.lower().split(",")[-1].strip() == "chunked"
            elif name == "content-length":
                length = int(value)
            elif name == "connection" and value.lower() == "close":
                self.close_after = True
        if parts[2] == "HTTP/1.0":
            self.close_after = True
        if chunked:
            self.framing = "chunked"
            self.state = SIZE
        elif length:
            self.framing = "length"
            self.remaining = length
            self.state = LENGTH

    def done(self):
        self.transport.write(RESPONSE)
        if self.stats:
            with open(self.stats, "a") as f:
                f.write(json.dumps({"port": self.port, "framing": self.framing, "target": self.target,
                                    "body_bytes": self.body_bytes, "chunks": self.chunks,
                                    "wire_bytes": self.wire}) + "\n")
        if self.close_after:
            self.transport.close()
        self.reset()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, action="append", required=True)
    ap.add_argument("--stats")
    a = ap.parse_args()
    loop = asyncio.get_running_loop()
    servers = []
    for port in a.port:
        servers.append(await loop.create_server(lambda p=port: Sink(p, a.stats), "127.0.0.1", port,
                                                backlog=1024, reuse_address=True))
    stop = asyncio.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    print(f"sink listening on 127.0.0.1:{','.join(map(str, a.port))}", flush=True)
    await stop.wait()
    for s in servers:
        s.close()


if __name__ == "__main__":
    asyncio.run(main())
