"""Groups that span machines: torchrun's standard multi-node rendezvous (c10d), one agent per machine.

Every machine runs the same command but for its node rank; node rank 0's machine hosts the rendezvous
store at ``endpoint`` (``--rdzv-conf=is_host=1`` there, 0 elsewhere: torchrun's own guess compares host
names, which fails where a host name resolves to another address, as inside network namespaces). c10d
numbers the ranks by the agents' addresses, not by node rank, so global rank 0 may be on another machine
than node rank 0: whatever node rank 0 must hold (the results) is sent to it by the group itself
(bench/timing.py), never assumed to be local. The ranks' peer sockets use the interface that holds this
machine's address toward the endpoint (``local_addr``; by default the source address the kernel's route to
the endpoint takes: no packet is sent).
"""
from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class Nodes:
    """This machine's place in a group of ``nnodes`` machines."""

    nnodes: int
    """machines in the group, each with the same number of ranks"""
    node_rank: int
    """this machine's, 0 .. nnodes - 1; 0 hosts the rendezvous store (and, in the bench, runs serial)"""
    endpoint: str
    """HOST:PORT of node rank 0's rendezvous store (the same on every machine)"""
    run_id: str = "pipefusion"
    """the rendezvous' name (the same on every machine)"""
    local_addr: str | None = None
    """this machine's address toward the others (None: the one the route to the endpoint's host uses)"""
    join_timeout_s: float = 600.0
    """how long an agent waits for the other machines to join"""

    def __post_init__(self) -> None:
        if self.nnodes < 2:
            raise ValueError(f"a group across machines needs nnodes >= 2, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node rank {self.node_rank} is not one of 0..{self.nnodes - 1} (nnodes={self.nnodes})")
        self.host_port()
        if not self.run_id or any(c.isspace() or c in ",=" for c in self.run_id):
            raise ValueError(f"rendezvous id {self.run_id!r}: give a non-empty name without spaces, ',' or '='")
        if not self.join_timeout_s > 0:
            raise ValueError(f"join timeout {self.join_timeout_s} s: give a positive number of seconds")

    def host_port(self) -> tuple[str, int]:
        host, sep, port = self.endpoint.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"rendezvous endpoint {self.endpoint!r}: give HOST:PORT of node rank 0's machine, "
                             "e.g. 10.0.0.1:29500")
        return host, int(port)

    def address(self) -> str:
        """This machine's address toward the others."""
        if self.local_addr:
            return self.local_addr
        host, port = self.host_port()
        try:
            family, _, _, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(where)  # UDP: picks the route and its source address, sends nothing
                return s.getsockname()[0]
        except OSError as exc:
            raise ValueError(f"no route from this machine to the rendezvous endpoint {self.endpoint!r} ({exc}): "
                             "check the address, or give this machine's address with --local-addr") from None

    def interface(self) -> str:
        """The network interface that holds ``address()`` (what gloo and NCCL bind their sockets to)."""
        addr = self.address()
        found = {n: [a.address for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)]
                 for n, addrs in psutil.net_if_addrs().items()}
        for name, addrs in found.items():
            if addr in addrs:
                return name
        have = ", ".join(f"{n} {'/'.join(a)}" for n, a in found.items() if a)
        raise ValueError(f"no network interface of this machine has the address {addr}: give --local-addr one "
                         f"of this machine's addresses ({have})")

    def agent_command(self, nproc: int, tail: list[str], folder: Path) -> list[str]:
        """torchrun's agent for this machine, starting ``nproc`` ranks of ``python tail``; its own folder in
        ``folder`` (``torchrun_dir``)."""
        conf = f"join_timeout={int(self.join_timeout_s)},is_host={int(self.node_rank == 0)}"
        return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={self.nnodes}",
                f"--nproc_per_node={nproc}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.endpoint}",
                f"--rdzv-id={self.run_id}", f"--local-addr={self.address()}", f"--rdzv-conf={conf}",
                "--max_restarts=0", "--monitor_interval=0.5", torchrun_dir(folder), *tail]

    def agent_env(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` with the ranks' peer sockets on this machine's interface toward the others."""
        dev = self.interface()
        return {**env, "GLOO_SOCKET_IFNAME": dev, "NCCL_SOCKET_IFNAME": dev}


def torchrun_dir(folder: Path) -> str:
    """torchrun's argument that puts its per-run folder (the ranks' error files) in ``folder``, a private
    folder removed with the group, rather than a new one in the system's temporary folder that outlives it."""
    return f"--log-dir={Path(folder) / 'torchrun'}"
