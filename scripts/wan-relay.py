#!/usr/bin/env python3
"""wan-relay.py: a userspace UDP relay that emulates a WAN link (no tc netem needed).

One QUIC (or any UDP) client talks to --listen; every datagram goes to --to from one
upstream socket, and the server's answers go back to the client's latest source address
(so a client that changes its source port, e.g. a restarted shipper or QUIC migration,
keeps working; one client at a time). With --multi, every client address gets its own
upstream socket instead (several shippers sharing one bottleneck, each counted apart).

    wan-relay.py --listen 127.0.0.1:7000 --to 127.0.0.1:7443 \\
        --delay-ms 50 --jitter-ms 0 --loss 0.005 --rate 200M [--queue 2500K]

Each direction is its own pipe with the same parameters (a symmetric link):

  --delay-ms D   one-way propagation delay, so the RTT is 2*D.
  --jitter-ms J  uniform extra delay in [-J, +J] per datagram; datagrams are never
                 reordered (a datagram is never delivered before the one ahead of it).
  --loss P       probability (0..1) that a datagram is dropped, independently per datagram.
  --rate R       bottleneck rate in BITS per second, like a link speed: 100M = 100 Mbit/s =
                 12.5 MB/s; suffixes K, M, G are powers of 1000 (not the shipper's
                 bandwidth_limit, which is bytes/s in powers of 1024). Each datagram costs
                 its payload plus --overhead bytes (28: IPv4 + UDP headers) of serialisation
                 time. 0 or absent: no rate limit.
  --queue B      bottleneck queue in bytes (suffixes K, M = 1024, 1048576), drop-tail;
                 default one bandwidth-delay product (rate * 2 * delay), at least 64 KiB.
                 Only meaningful with --rate.
  --mtu M        the largest datagram payload the link carries (default 1472: a 1500-byte
                 Ethernet path, IPv4 + UDP); bigger ones are dropped, as a router drops a
                 packet it may not fragment (QUIC's MTU discovery then settles at or below
                 M; loopback alone would carry 64 KiB datagrams, which no WAN does). 0: no
                 limit.

Control:
  SIGUSR1        toggle the link down/up: while down every datagram, both ways, is dropped
                 (what is already in flight on the "wire" is still delivered).
  SIGUSR2        print the statistics now (and write --stats-json).
  SIGTERM/SIGINT print the statistics and exit (also written as JSON to --stats-json).

Socket buffers: --sock-buffer (default 32M) for both sockets, past net.core.rmem_max when
running as root (SO_RCVBUFFORCE), so bursts are not dropped by the kernel before the relay
reads them; the kernel's drops are reported separately from the emulated ones.

Statistics: datagrams/bytes forwarded and dropped (loss, queue overflow, link down, send
errors) per direction, the kernel's receive-buffer drops of the relay's sockets (a relay
that cannot keep up shows here), CPU seconds used, and the wall-clock times of the first
and last "big" client-to-server datagram (>= --big bytes, default 1000), which a benchmark
uses to time a bulk transfer.

Queue occupancy at the bottleneck (with --rate), per direction: the time-weighted mean of
the bytes queued (exact: the backlog drains linearly between arrivals) over the relay's
life and over the busy period (first to last big datagram, client to server; the figure a
bulk-transfer benchmark wants), the maximum in bytes and in datagrams, and the mean in
datagrams (mean bytes / mean datagram size).

CPU ceiling: about 10 us per datagram on one core of the development machines, i.e. roughly
90-100 k datagrams/s or 850-950 Mbit/s of 1200-byte datagrams (benches/wan.sh measures it on
the machine at hand and prints it beside its results).

Python 3 standard library only; one thread, an epoll loop that sleeps until the next
datagram arrives or is due (no busy polling). For safety --to must be a loopback address
unless --allow-remote is given.
"""

import argparse
import collections
import ipaddress
import json
import os
import random
import resource
import selectors
import signal
import socket
import sys
import time

C2S, S2C = 0, 1
DIRS = ("client->server", "server->client")


def parse_rate(s):
    """Bits per second: '100M' -> 100e6. Suffixes K/M/G = 1e3/1e6/1e9."""
    t = s.strip().lower()
    for unit in ("bit/s", "bps", "bit", "b"):
        if t.endswith(unit) and len(t) > len(unit):
            t = t[: -len(unit)]
            break
    mult = {"k": 1e3, "m": 1e6, "g": 1e9}.get(t[-1:], None)
    if mult:
        t = t[:-1]
    v = float(t) * (mult or 1)
    if v < 0:
        raise argparse.ArgumentTypeError("rate must be >= 0")
    return v


def parse_bytes(s):
    t = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], None)
    if mult:
        t = t[:-1]
    v = int(float(t) * (mult or 1))
    if v <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def parse_addr(s):
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{s!r}: expected HOST:PORT")
    host = host.strip("[]")
    infos = socket.getaddrinfo(host, int(port), 0, socket.SOCK_DGRAM)
    fam, _, _, _, sa = infos[0]
    return fam, sa


def loss_prob(s):
    v = float(s)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError("loss is a probability between 0 and 1")
    return v


class Pipe:
    """One direction of the emulated link: loss, bottleneck (rate + drop-tail queue),
    propagation delay (+ jitter), in that order."""

    __slots__ = (
        "rate_Bps", "queue", "overhead", "delay", "jitter", "loss", "busy_until",
        "last_deliver", "inflight", "fwd_pkts", "fwd_bytes", "drop_loss", "drop_queue",
        "drop_down", "drop_send", "max_backlog", "q_area", "q_t", "q_t0", "departures",
        "max_qpkts", "adm_pkts", "adm_bytes", "busy_area0", "busy_t0", "busy_area1",
        "busy_t1", "mtu", "drop_mtu",
    )

    def __init__(self, a):
        self.rate_Bps = a.rate / 8.0 if a.rate else 0.0
        self.queue = a.queue
        self.overhead = a.overhead
        self.delay = a.delay_ms / 1000.0
        self.jitter = a.jitter_ms / 1000.0
        self.loss = a.loss
        self.mtu = a.mtu
        self.drop_mtu = 0
        self.busy_until = 0.0
        self.last_deliver = 0.0
        self.inflight = collections.deque()  # (deliver_at, datagram), deliver_at ascending
        self.fwd_pkts = self.fwd_bytes = 0
        self.drop_loss = self.drop_queue = self.drop_down = self.drop_send = 0
        self.max_backlog = 0
        # Queue occupancy: integral of the backlog (byte-seconds) up to q_t; departure times
        # of the datagrams still queued (for the datagram count); the integral at the start
        # and end of the busy period (first/last big datagram).
        self.q_area = 0.0
        self.q_t = self.q_t0 = time.monotonic()
        self.departures = collections.deque()
        self.max_qpkts = 0
        self.adm_pkts = self.adm_bytes = 0
        self.busy_area0 = self.busy_t0 = self.busy_area1 = self.busy_t1 = None

    def integrate(self, now):
        """Adds the backlog's area from q_t to now (it drains at rate_Bps) to q_area."""
        dt = now - self.q_t
        if dt <= 0 or not self.rate_Bps:
            self.q_t = max(self.q_t, now)
            return
        b0 = max(0.0, (self.busy_until - self.q_t) * self.rate_Bps)
        drained = dt * self.rate_Bps
        if b0 <= drained:
            self.q_area += b0 * b0 / (2 * self.rate_Bps)
        else:
            self.q_area += (2 * b0 - drained) / 2 * dt
        self.q_t = now

    def mark_busy(self, now):
        """A big datagram arrived: the busy period starts (first one) or extends to now."""
        self.integrate(now)
        if self.busy_t0 is None:
            self.busy_area0, self.busy_t0 = self.q_area, now
        self.busy_area1, self.busy_t1 = self.q_area, now

    def queue_stats(self, now):
        self.integrate(now)
        life = now - self.q_t0
        mean = self.q_area / life if life > 0 else 0.0
        busy = None
        if self.busy_t0 is not None and self.busy_t1 > self.busy_t0:
            busy = (self.busy_area1 - self.busy_area0) / (self.busy_t1 - self.busy_t0)
        size = self.adm_bytes / self.adm_pkts if self.adm_pkts else 0
        return {
            "mean_queue_bytes": round(mean, 1),
            "mean_queue_bytes_busy": None if busy is None else round(busy, 1),
            "mean_queue_packets_busy": None if busy is None or not size else round(busy / size, 2),
            "max_queue_packets": self.max_qpkts,
        }

    def stats(self):
        s = self.queue_stats(time.monotonic())
        s.update({
            "forwarded_packets": self.fwd_pkts,
            "forwarded_bytes": self.fwd_bytes,
            "dropped_loss": self.drop_loss,
            "dropped_queue": self.drop_queue,
            "dropped_down": self.drop_down,
            "dropped_send_error": self.drop_send,
            "dropped_mtu": self.drop_mtu,
            "max_queue_bytes": int(self.max_backlog),
            "in_flight": len(self.inflight),
        })
        return s


def udp_drops(ports):
    """Kernel receive drops of our sockets (last column of /proc/net/udp{,6})."""
    total = 0
    for f in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(f) as fh:
                next(fh)
                for line in fh:
                    p = line.split()
                    if int(p[1].rsplit(":", 1)[1], 16) in ports:
                        total += int(p[-1])
        except (OSError, ValueError, IndexError):
            pass
    return total


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--listen", required=True, type=parse_addr, help="HOST:PORT the client sends to")
    ap.add_argument("--to", required=True, type=parse_addr, help="HOST:PORT of the server")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction (RTT = 2x)")
    ap.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +-jitter on the delay (no reordering)")
    ap.add_argument("--loss", type=loss_prob, default=0.0, help="drop probability per datagram, 0..1")
    ap.add_argument("--rate", type=parse_rate, default=0.0, help="bottleneck rate in bits/s, e.g. 100M")
    ap.add_argument("--queue", type=parse_bytes, default=None, help="bottleneck queue bytes (default 1 BDP)")
    ap.add_argument("--mtu", type=int, default=1472,
                    help="largest datagram payload carried, bigger ones dropped (0: no limit)")
    ap.add_argument("--overhead", type=int, default=28, help="bytes added per datagram for the rate (IPv4+UDP)")
    ap.add_argument("--sock-buffer", type=parse_bytes, default=32 << 20,
                    help="UDP socket buffer bytes (default 32M; see below)")
    ap.add_argument("--big", type=int, default=1000, help="size of a 'big' datagram for the transfer timestamps")
    ap.add_argument("--seed", type=int, default=None, help="random seed (repeatable loss pattern)")
    ap.add_argument("--stats-interval", type=float, default=0.0, help="print statistics every N seconds")
    ap.add_argument("--stats-json", default=None, help="write final statistics as JSON to this file")
    ap.add_argument("--start-down", action="store_true", help="start with the link cut")
    ap.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --to address")
    ap.add_argument("--multi", action="store_true",
                    help="one upstream socket per client address (several clients share the link)")
    a = ap.parse_args()

    lfam, laddr = a.listen
    tfam, taddr = a.to
    if not a.allow_remote and not ipaddress.ip_address(taddr[0]).is_loopback:
        ap.error(f"--to {taddr[0]} is not a loopback address (use --allow-remote to insist)")
    if a.delay_ms < 0 or a.jitter_ms < 0:
        ap.error("delay and jitter must be >= 0")
    if a.queue is None:
        bdp = int(a.rate / 8.0 * 2 * a.delay_ms / 1000.0)
        a.queue = max(bdp, 64 << 10)
    rng = random.Random(a.seed)
    rand = rng.random
    uniform = rng.uniform

    down = [a.start_down]
    client_changes = [0]
    big_first = [0.0]
    big_last = [0.0]
    big = a.big
    pipes = (Pipe(a), Pipe(a))

    # Big socket buffers absorb the senders' bursts (GSO batches, BBR): as root the *FORCE
    # options go past net.core.{r,w}mem_max (for these sockets only); otherwise the kernel
    # caps the plain options there.
    force = {socket.SO_RCVBUF: getattr(socket, "SO_RCVBUFFORCE", 33),
             socket.SO_SNDBUF: getattr(socket, "SO_SNDBUFFORCE", 32)}

    def buffered(s):
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, force[opt], a.sock_buffer)
            except OSError:
                try:
                    s.setsockopt(socket.SOL_SOCKET, opt, a.sock_buffer)
                except OSError:
                    pass
        s.setblocking(False)
        return s

    class Client:
        """A client address and the upstream socket its datagrams leave from."""
        __slots__ = ("n", "addr", "usock", "usend", "urecv", "fwd_pkts", "fwd_bytes",
                     "big_first", "big_last")

        def __init__(self, n):
            self.n = n
            self.addr = None
            self.usock = buffered(socket.socket(tfam, socket.SOCK_DGRAM))
            self.usock.connect(taddr)  # the kernel then only hands us the server's datagrams
            self.usend, self.urecv = self.usock.send, self.usock.recv
            self.fwd_pkts = self.fwd_bytes = 0
            self.big_first = self.big_last = 0.0

    lsock = buffered(socket.socket(lfam, socket.SOCK_DGRAM))
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(laddr)
    clients = {}  # address -> Client (--multi)
    single = Client(1)  # the one upstream socket without --multi
    ports = {lsock.getsockname()[1], single.usock.getsockname()[1]}

    t_start = time.monotonic()
    wall_start = time.time()

    def snapshot():
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "listen": "%s:%d" % lsock.getsockname()[:2],
            "to": "%s:%d" % taddr[:2],
            "params": {
                "delay_ms": a.delay_ms, "jitter_ms": a.jitter_ms, "loss": a.loss,
                "rate_bits": a.rate, "queue_bytes": a.queue, "overhead": a.overhead,
            },
            "link_down": down[0],
            "client": "%s:%d" % single.addr[:2] if single.addr else None,
            "client_address_changes": client_changes[0],
            "clients": [
                {"n": c.n, "addr": "%s:%d" % c.addr[:2], "c2s_forwarded_packets": c.fwd_pkts,
                 "c2s_forwarded_bytes": c.fwd_bytes,
                 "big_c2s_first_wall": c.big_first and wall_start + (c.big_first - t_start),
                 "big_c2s_last_wall": c.big_last and wall_start + (c.big_last - t_start)}
                for c in (clients.values() if a.multi else [single] if single.addr else [])
            ],
            "elapsed_s": round(time.monotonic() - t_start, 3),
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
            "kernel_rx_drops": udp_drops(ports),
            "big_c2s_first_wall": big_first[0] and wall_start + (big_first[0] - t_start),
            "big_c2s_last_wall": big_last[0] and wall_start + (big_last[0] - t_start),
            DIRS[C2S]: pipes[C2S].stats(),
            DIRS[S2C]: pipes[S2C].stats(),
        }

    def report(tag):
        s = snapshot()
        lines = [
            f"wan-relay {tag}: {s['elapsed_s']:.1f} s, cpu {s['cpu_s']:.1f} s, "
            f"link {'DOWN' if s['link_down'] else 'up'}, client {s['client']} "
            f"(address changes {s['client_address_changes']}), "
            f"kernel rx drops {s['kernel_rx_drops']}"
        ]
        for d in DIRS:
            p = s[d]
            lines.append(
                f"  {d}: forwarded {p['forwarded_packets']} pkts {p['forwarded_bytes']} B; "
                f"dropped loss {p['dropped_loss']} queue {p['dropped_queue']} "
                f"down {p['dropped_down']} send-error {p['dropped_send_error']} "
                f"over-mtu {p['dropped_mtu']}; "
                f"queue mean {p['mean_queue_bytes']:.0f} B (busy period "
                f"{p['mean_queue_bytes_busy'] if p['mean_queue_bytes_busy'] is not None else '-'} B), "
                f"max {p['max_queue_bytes']} B / {p['max_queue_packets']} datagrams"
            )
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()
        return s

    stop = [False]
    want_report = [False]

    def on_term(signum, frame):
        stop[0] = True

    def on_usr1(signum, frame):
        down[0] = not down[0]
        sys.stderr.write(f"wan-relay: link {'DOWN' if down[0] else 'UP'}\n")
        sys.stderr.flush()

    def on_usr2(signum, frame):
        want_report[0] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGUSR2, on_usr2)
    # A signal must wake the loop at once: write a byte to a pipe the loop watches.
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    os.set_blocking(wfd, False)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)

    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, C2S)
    sel.register(single.usock, selectors.EVENT_READ, single)
    sel.register(rfd, selectors.EVENT_READ, -1)

    sys.stderr.write(
        f"wan-relay: {lsock.getsockname()[0]}:{lsock.getsockname()[1]} -> {taddr[0]}:{taddr[1]}; "
        f"delay {a.delay_ms} ms each way (RTT {2 * a.delay_ms} ms), jitter {a.jitter_ms} ms, "
        f"loss {a.loss}, rate {a.rate / 1e6:g} Mbit/s{' (unlimited)' if not a.rate else ''}, "
        f"queue {a.queue} B{', link DOWN' if down[0] else ''}"
        f"{', one upstream socket per client' if a.multi else ''}\n"
    )
    sys.stderr.flush()

    monotonic = time.monotonic
    lrecv, lsend = lsock.recvfrom, lsock.sendto
    BATCH = 256
    next_stats = monotonic() + a.stats_interval if a.stats_interval > 0 else float("inf")

    def admit(p, data, now, cl):
        """Loss, then bottleneck, then propagation; queues the datagram or drops it."""
        if down[0]:
            p.drop_down += 1
            return
        if p.mtu and len(data) > p.mtu:
            p.drop_mtu += 1
            return
        if p.loss and rand() < p.loss:
            p.drop_loss += 1
            return
        t = now
        if p.rate_Bps:
            busy = p.busy_until
            if busy > now:
                backlog = (busy - now) * p.rate_Bps
                if backlog + len(data) > p.queue:
                    p.drop_queue += 1
                    return
                if backlog > p.max_backlog:
                    p.max_backlog = backlog
            else:
                busy = now
            p.integrate(now)
            t = busy + (len(data) + p.overhead) / p.rate_Bps
            p.busy_until = t
            deps = p.departures
            while deps and deps[0] <= now:
                deps.popleft()
            deps.append(t)
            if len(deps) > p.max_qpkts:
                p.max_qpkts = len(deps)
            p.adm_pkts += 1
            p.adm_bytes += len(data)
            if p is pc2s and len(data) >= big:
                p.mark_busy(now)
        if p.jitter:
            t += max(0.0, p.delay + uniform(-p.jitter, p.jitter))
        else:
            t += p.delay
        if t < p.last_deliver:
            t = p.last_deliver
        p.last_deliver = t
        p.inflight.append((t, data, cl))

    pc2s, ps2c = pipes
    q_c2s, q_s2c = pc2s.inflight, ps2c.inflight

    while not stop[0]:
        now = monotonic()
        # Deliver what is due.
        while q_c2s and q_c2s[0][0] <= now:
            t, data, cl = q_c2s.popleft()
            try:
                cl.usend(data)
                pc2s.fwd_pkts += 1
                n = len(data)
                pc2s.fwd_bytes += n
                cl.fwd_pkts += 1
                cl.fwd_bytes += n
                if n >= big:
                    if not big_first[0]:
                        big_first[0] = now
                    big_last[0] = now
                    if not cl.big_first:
                        cl.big_first = now
                    cl.big_last = now
            except OSError:
                pc2s.drop_send += 1
        while q_s2c and q_s2c[0][0] <= now:
            t, data, cl = q_s2c.popleft()
            try:
                lsend(data, cl.addr)
                ps2c.fwd_pkts += 1
                ps2c.fwd_bytes += len(data)
            except (OSError, TypeError):
                ps2c.drop_send += 1
        if want_report[0]:
            want_report[0] = False
            s = report("stats")
            if a.stats_json:
                with open(a.stats_json + ".tmp", "w") as fh:
                    json.dump(s, fh, indent=1)
                os.replace(a.stats_json + ".tmp", a.stats_json)
        if now >= next_stats:
            report("stats")
            next_stats = now + a.stats_interval
        # Sleep until a datagram arrives or the next one is due (epoll rounds up to 1 ms).
        due = min(q_c2s[0][0] if q_c2s else float("inf"), q_s2c[0][0] if q_s2c else float("inf"),
                  next_stats)
        timeout = None if due == float("inf") else max(0.0, due - monotonic())
        for key, _ in sel.select(timeout):
            d = key.data
            if d == -1:
                try:
                    while os.read(rfd, 512):
                        pass
                except BlockingIOError:
                    pass
                continue
            now = monotonic()
            if d == C2S:
                for _ in range(BATCH):
                    try:
                        data, src = lrecv(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        continue  # e.g. ICMP errors surfacing as ECONNREFUSED
                    if a.multi:
                        cl = clients.get(src)
                        if cl is None:
                            cl = clients[src] = Client(len(clients) + 1)
                            cl.addr = src
                            ports.add(cl.usock.getsockname()[1])
                            sel.register(cl.usock, selectors.EVENT_READ, cl)
                            sys.stderr.write(f"wan-relay: client #{cl.n} is {src[0]}:{src[1]}\n")
                            sys.stderr.flush()
                    else:
                        cl = single
                        if src != cl.addr:
                            if cl.addr is not None:
                                client_changes[0] += 1
                                sys.stderr.write(f"wan-relay: client is now {src[0]}:{src[1]}\n")
                            cl.addr = src
                    admit(pc2s, data, now, cl)
            else:
                cl = d
                for _ in range(BATCH):
                    try:
                        data = cl.urecv(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        continue  # server port closed (ICMP port unreachable)
                    admit(ps2c, data, now, cl)

    s = report("exit")
    if a.stats_json:
        with open(a.stats_json, "w") as fh:
            json.dump(s, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
