"""Is the rendezvous port free on the first node? Checked before the ranks start, when the first node is this machine.

The first rank's rendezvous store (torch.distributed's TCPStore, behind DeepSpeed, torchrun and gaudi_spawn alike)
listens on `--master_port` on every interface of the first node. When something already holds that port, every rank
waits for a store that never comes up and the launch fails many seconds later as "rank 0 died". A bind test on the
same port, with the store's own SO_REUSEADDR (so a port left in TIME_WAIT by an earlier run still counts as free), says
so at once. A first node that is another machine is not probed from here.

`master_port_problem` is the decision (pure: the probe is an argument); `bind_error` is the probe;
`master_port_problem_for` reads the hosts from the hostfile (what `launch train` calls before it writes anything).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Sequence

from launch.command.hostfile import HostEntry, HostfileError, is_loopback, parse_hostfile

SUGGESTION_SPAN = 100  # ports above --master_port tried for a free one to suggest


def bind_error(port: int) -> OSError | None:
    """None when a listening socket can bind `port` on every interface of this machine (IPv4, and IPv6 where the
    machine has it), as the rendezvous store does; else the OSError the bind raised."""
    for family, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this machine
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((any_addr, port))
                sock.listen(1)
            except OSError as e:
                if family == socket.AF_INET6 and e.errno == errno.EADDRNOTAVAIL:  # IPv6 is off
                    continue
                return e
    return None


def first_node_is_local(hosts: Sequence[HostEntry] | None) -> bool:
    """One node (no hostfile), or a hostfile whose first host, the master, is this machine's loopback."""
    return not hosts or is_loopback(hosts[0].host)


def master_port_problem(port: int, hosts: Sequence[HostEntry] | None,
                        probe: Callable[[int], OSError | None] = bind_error) -> str | None:
    """Why `port` cannot be the rendezvous port of a launch whose first node is this machine, with the fix (a free
    port to pass instead); None when it can, or when the first node is another machine. A port outside 1..65535 is
    the launch command's to refuse."""
    if not isinstance(port, int) or not 1 <= port <= 65535 or not first_node_is_local(hosts):
        return None
    err = probe(port)
    if err is None:
        return None
    why = "is in use by another process" if err.errno == errno.EADDRINUSE else f"cannot be opened ({err.strerror or err})"
    free = next((p for p in range(port + 1, min(port + SUGGESTION_SPAN, 65535) + 1) if probe(p) is None), None)
    fix = f"pass --master_port {free} (free now)" if free else "pass --master_port with a free TCP port"
    return (f"--master_port {port} {why} on this machine, the first node: the ranks' rendezvous could not start there. "
            f"Nothing was launched. Fix: {fix}, or stop what holds port {port}.")


def master_port_problem_for(port: int, hostfile: str | None,
                            probe: Callable[[int], OSError | None] = bind_error) -> str | None:
    """`master_port_problem` for a launch on the nodes of `hostfile` (None: this machine alone). A hostfile that
    cannot be read or parsed is the planner's to refuse, with its own message: no verdict here."""
    try:
        hosts = parse_hostfile(hostfile) if hostfile else None
    except HostfileError:
        return None
    return master_port_problem(port, hosts, probe)
