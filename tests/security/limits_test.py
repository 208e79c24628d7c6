#!/usr/bin/python3
"""normd's HTTP/2 limits seen from a client: --max-concurrent-streams, keepalive enforcement
(--keepalive-min-time), --max-connection-age and its grace, --max-connection-idle and
--max-metadata-bytes. Each limit is checked next to a server without it, so the test fails when
the flag stops reaching gRPC.

Connections are told apart by their client-side TCP port, read from /proc/net/tcp: every server
here listens on its own fresh loopback port, so the ESTABLISHED sockets whose remote port is that
port are exactly this test's connections to it.
"""

import queue
import sys
import threading
import time
import unittest

import grpc

from normd.v1 import normd_pb2 as pb
from security_common import MLP, TRAINER, Normd, code_of, raw_unary, train_step_request

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def client_ports(server_port):
    """Local ports of the ESTABLISHED TCP connections to 127.0.0.1:server_port."""
    ports = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == server_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


class OpenStream:
    """A TrainStream kept open: send() queues a request, next() waits for the next event, which
    is a TrainStepResponse or ("end", code, details)."""

    def __init__(self, channel, timeout=60):
        self._requests = queue.Queue()
        self._events = queue.Queue()
        call = channel.stream_stream(TRAINER + "TrainStream",
                                     request_serializer=pb.TrainStepRequest.SerializeToString,
                                     response_deserializer=pb.TrainStepResponse.FromString)
        self._call = call(iter(self._requests.get, None), timeout=timeout)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        try:
            for response in self._call:
                self._events.put(response)
            self._events.put(("end", OK, ""))
        except grpc.RpcError as e:
            self._events.put(("end", e.code(), e.details()))

    def send(self, request):
        self._requests.put(request)

    def close(self):
        self._requests.put(None)

    def next(self, timeout):
        """The next event, or None when none comes within `timeout` seconds."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def pending(self):
        return self._events.qsize()


def create_model(channel, model="m"):
    raw_unary(channel, "CreateModel",
              pb.CreateModelRequest(id=model, spec=MLP).SerializeToString())


class ConcurrentStreamsTest(unittest.TestCase):
    def test_streams_beyond_the_limit_wait_for_a_free_slot(self):
        n = 3
        with Normd("--max-concurrent-streams", str(n)) as server:
            channel = grpc.insecure_channel(server.address)
            create_model(channel)
            streams = [OpenStream(channel) for _ in range(n + 2)]
            for s in streams:
                s.send(train_step_request("m"))
            # The first n streams are open on the connection and answered.
            for s in streams[:n]:
                self.assertIsInstance(s.next(timeout=10), pb.TrainStepResponse)
            # The other two never reached the server: gRPC's client holds them until the
            # server's SETTINGS_MAX_CONCURRENT_STREAMS lets it open another.
            time.sleep(1.0)
            self.assertEqual([s.pending() for s in streams[n:]], [0, 0])
            # Another connection has its own n streams. (Channels with the same target and
            # arguments share a connection; a local subchannel pool gives this one its own.)
            other = grpc.insecure_channel(server.address,
                                          options=[("grpc.use_local_subchannel_pool", 1)])
            elsewhere = OpenStream(other)
            elsewhere.send(train_step_request("m"))
            self.assertIsInstance(elsewhere.next(timeout=10), pb.TrainStepResponse)
            # Each stream that ends frees one slot for one waiting stream.
            streams[0].close()
            self.assertEqual(streams[0].next(timeout=10), ("end", OK, ""))
            first_waiting = streams[n].next(timeout=10)
            self.assertIsInstance(first_waiting, pb.TrainStepResponse)
            time.sleep(0.5)
            self.assertEqual(streams[n + 1].pending(), 0)
            streams[1].close()
            self.assertIsInstance(streams[n + 1].next(timeout=10), pb.TrainStepResponse)
            for s in streams[2:] + [elsewhere]:
                s.close()
            channel.close()
            other.close()


class KeepaliveTest(unittest.TestCase):
    def test_a_client_pinging_too_often_is_disconnected(self):
        # A client that pings every 200 ms, with and without calls in flight.
        pinger = [("grpc.keepalive_time_ms", 200), ("grpc.keepalive_permit_without_calls", 1),
                  ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_timeout_ms", 10000)]
        with Normd("--keepalive-min-time", "5") as strict, \
                Normd("--keepalive-min-time", "0.1") as lenient:
            channels = {}
            streams = {}
            for name, server, options in (("strict-pinger", strict, pinger),
                                          ("strict-normal", strict, []),
                                          ("lenient-pinger", lenient, pinger)):
                channels[name] = grpc.insecure_channel(server.address, options=options)
                if name != "strict-normal":
                    create_model(channels[name])
                streams[name] = OpenStream(channels[name])
                streams[name].send(train_step_request("m"))
                self.assertIsInstance(streams[name].next(timeout=10), pb.TrainStepResponse)
            begin = time.monotonic()
            end = streams["strict-pinger"].next(timeout=20)
            elapsed = time.monotonic() - begin
            self.assertIsNotNone(end, "the pinging client was not disconnected within 20 s")
            self.assertEqual(end[:2], ("end", UNAVAILABLE), end)
            self.assertIn("too many pings", end[2].lower())
            print(f"pinging client disconnected after {elapsed:.1f} s "
                  f"(--keepalive-min-time 5, pings every 0.2 s)")
            # The well-behaved client on the same server, and the same pinging client against a
            # server that allows its rate, are unaffected.
            for name in ("strict-normal", "lenient-pinger"):
                streams[name].send(train_step_request("m"))
                self.assertIsInstance(streams[name].next(timeout=10), pb.TrainStepResponse, name)
                streams[name].close()
                self.assertEqual(streams[name].next(timeout=10), ("end", OK, ""), name)
            for ch in channels.values():
                ch.close()


class ConnectionLifetimeTest(unittest.TestCase):
    def test_age_idle_and_grace(self):
        with Normd("--max-connection-age", "1") as aged, \
                Normd("--max-connection-age", "1", "--max-connection-age-grace", "0.5") as graced, \
                Normd("--max-connection-idle", "1") as idle, \
                Normd() as default:
            busy = {"aged": grpc.insecure_channel(aged.address),
                    "default": grpc.insecure_channel(default.address)}
            create_model(busy["aged"])
            # A TrainStream opened before the first GOAWAY.
            long_stream = OpenStream(busy["aged"])
            long_stream.send(train_step_request("m"))
            self.assertIsInstance(long_stream.next(timeout=10), pb.TrainStepResponse)
            graced_channel = grpc.insecure_channel(graced.address)
            create_model(graced_channel)
            cut_stream = OpenStream(graced_channel)
            cut_stream.send(train_step_request("m"))
            self.assertIsInstance(cut_stream.next(timeout=10), pb.TrainStepResponse)
            idle_channel = grpc.insecure_channel(idle.address)
            raw_unary(idle_channel, "ListModels", b"")
            idle_ports_before = client_ports(idle.port)
            self.assertEqual(len(idle_ports_before), 1)

            # 3.5 s of unary calls on the busy channels, noting every connection seen.
            seen = {name: set() for name in busy}
            calls = errors = 0
            deadline = time.monotonic() + 3.5
            while time.monotonic() < deadline:
                for name, ch in busy.items():
                    code, details = code_of(lambda: raw_unary(ch, "ListModels", b""))
                    calls += 1
                    errors += code != OK
                    seen[name] |= client_ports(aged.port if name == "aged" else default.port)
                time.sleep(0.02)
            print(f"{calls} calls, {errors} errors; connections seen: "
                  f"--max-connection-age 1: {len(seen['aged'])}, default: {len(seen['default'])}")
            self.assertEqual(errors, 0)
            self.assertGreaterEqual(len(seen["aged"]), 3)  # ~1 s each, +-10 % jitter
            self.assertEqual(len(seen["default"]), 1)

            # Grace 0 (no limit): the stream opened on the first connection still trains.
            long_stream.send(train_step_request("m"))
            self.assertIsInstance(long_stream.next(timeout=10), pb.TrainStepResponse)
            long_stream.close()
            # Grace 0.5 s: the stream left open on an aged connection was ended by the server.
            end = cut_stream.next(timeout=10)
            self.assertIsNotNone(end)
            self.assertEqual(end[:2], ("end", UNAVAILABLE), end)

            # The idle connection is gone (3.5 s without a call > 1 s), and the channel
            # reconnects on the next call.
            self.assertEqual(client_ports(idle.port), set())
            raw_unary(idle_channel, "ListModels", b"")
            after = client_ports(idle.port)
            self.assertEqual(len(after), 1)
            self.assertNotEqual(after, idle_ports_before)
            for ch in list(busy.values()) + [graced_channel, idle_channel]:
                ch.close()


class MetadataSizeTest(unittest.TestCase):
    def test_oversized_metadata_is_refused(self):
        with Normd() as default, Normd("--max-metadata-bytes", "2048") as small:
            for server, fits, too_big in ((default, 7000, 9000), (small, 1000, 3000)):
                with grpc.insecure_channel(server.address) as ch:
                    def call(n):
                        return code_of(lambda: raw_unary(ch, "ListModels", b"",
                                                         metadata=(("x-pad", "a" * n),)))
                    self.assertEqual(call(fits)[0], OK, fits)
                    code, details = call(too_big)
                    self.assertEqual(code, grpc.StatusCode.RESOURCE_EXHAUSTED, too_big)
                    self.assertIn("metadata size exceeds limit", details)


if __name__ == "__main__":
    unittest.main(verbosity=2, argv=[sys.argv[0]])
