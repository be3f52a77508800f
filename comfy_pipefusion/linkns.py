"""Two "machines" on one machine: network namespaces joined by a veth pair, shaped with ``tc``.

Used by ``bench --link`` and the tests (root only): each side is a namespace with one end of the pair
(10.R.S.1 and .2), loopback up, and the link shaped on both ends to a named speed with a realistic
one-way latency. ``netem`` (rate and delay) is used where the kernel has it; without it, ``tbf`` shapes
the rate and the latency stays the veth's own (microseconds), which ``Shaped.latency_s`` reports.
Everything is removed on ``close`` (deleting a namespace deletes its end of the pair, and so the pair);
names carry this process's id, so a sweep can remove what a killed owner left (``sweep``).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass

import psutil

# name -> (bits per second, one-way latency in seconds): a 10 GbE switch, a 1 GbE LAN, a 100 Mbit/s office link
LINKS = {"10gbit": (10e9, 50e-6), "1gbit": (1e9, 100e-6), "100mbit": (100e6, 500e-6)}
PREFIX = "pfl"
CMD_S = 10.0


class LinkUnavailable(RuntimeError):
    """Namespaces or shaping cannot be made here (not root, no ``ip``/``tc``, no CAP_NET_ADMIN)."""


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=CMD_S)


def why_not() -> str | None:
    """None where namespaces can be made here, else the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN); CI runs as root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the {tool!r} command is missing (iproute2)"
    name = f"{PREFIX}{os.getpid()}probe"
    made = _run("ip", "netns", "add", name)
    if made.returncode != 0:
        return f"'ip netns add' failed: {made.stderr.strip()}"
    _run("ip", "netns", "del", name)
    return None


@dataclass
class Shaped:
    """A namespace pair joined by a shaped link; ``close`` removes it."""

    names: tuple[str, str]
    devs: tuple[str, str]
    addrs: tuple[str, str]
    speed: str
    bits_per_s: float
    latency_s: float
    qdisc: str

    def exec_prefix(self, side: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[side]]

    def close(self) -> None:
        for n in self.names:
            _run("ip", "netns", "del", n)

    def __enter__(self) -> "Shaped":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shape(ns: str, dev: str, bits: float, delay: float) -> str:
    rate = f"{int(bits / 1e6)}mbit"
    netem = _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem",
                 "delay", f"{int(delay * 1e6)}us", "rate", rate, "limit", "100000")
    if netem.returncode == 0:
        return "netem"
    burst = max(32 * 1024, int(bits / 8 / 250))  # a few ms worth at this rate
    tbf = _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
               "burst", str(burst), "latency", "100ms")
    if tbf.returncode != 0:
        raise LinkUnavailable(f"tc cannot shape {dev}: netem: {netem.stderr.strip()}; tbf: {tbf.stderr.strip()}")
    return "tbf"


def make(speed: str) -> Shaped:
    """Two namespaces joined by a veth pair shaped to ``speed`` (a key of LINKS)."""
    if speed not in LINKS:
        raise ValueError(f"unknown link {speed!r}: choose one of {', '.join(LINKS)}")
    reason = why_not()
    if reason:
        raise LinkUnavailable(reason)
    bits, delay = LINKS[speed]
    tag = f"{os.getpid()}{secrets.token_hex(2)}"
    names, devs = (f"{PREFIX}{tag}a", f"{PREFIX}{tag}b"), (f"{PREFIX}{tag}x", f"{PREFIX}{tag}y")
    octet = 16 + int(secrets.token_hex(1), 16) % 200
    addrs = (f"10.213.{octet}.1", f"10.213.{octet}.2")
    link = Shaped(names, devs, addrs, speed, bits, delay, "")
    try:
        for n in names:
            _check(_run("ip", "netns", "add", n))
        _check(_run("ip", "link", "add", devs[0], "type", "veth", "peer", "name", devs[1]))
        qdiscs = []
        for n, d, a in zip(names, devs, addrs):
            _check(_run("ip", "link", "set", d, "netns", n))
            _check(_run("ip", "-n", n, "addr", "add", f"{a}/24", "dev", d))
            _check(_run("ip", "-n", n, "link", "set", d, "up"))
            _check(_run("ip", "-n", n, "link", "set", "lo", "up"))
            qdiscs.append(_shape(n, d, bits, delay))
        link.qdisc = qdiscs[0]
        if link.qdisc != "netem":
            link.latency_s = 0.0  # unshaped: the veth's own
        return link
    except BaseException:
        link.close()
        _run("ip", "link", "del", devs[0])
        raise


def _check(done: subprocess.CompletedProcess) -> None:
    if done.returncode != 0:
        raise LinkUnavailable(f"{' '.join(done.args)} failed: {done.stderr.strip()}")


def sweep() -> list[str]:
    """Remove namespaces this module made for processes that are gone."""
    listed = _run("ip", "netns", "list")
    removed = []
    for line in listed.stdout.splitlines():
        m = re.match(rf"({PREFIX}(\d+)[0-9a-f]{{4}}[ab])\b", line)
        if m and not psutil.pid_exists(int(m.group(2))):
            _run("ip", "netns", "del", m.group(1))
            removed.append(m.group(1))
    return removed
