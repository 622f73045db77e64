"""Preflight for multi-node launches: is every host of the hostfile there, before training starts?

    python -m launch.preflight --hostfile hosts.txt [--port 22] [--timeout 3] [--ssh]

DeepSpeed's launcher reads a hostfile of ``<host> slots=<gpus>`` lines and reaches every host
with pdsh/ssh; a typo or a dead node otherwise shows up minutes later as a hung rendezvous (and a
missing hostfile silently falls back to the local machine). This checks, for every host, that
the file parses the way DeepSpeed parses it, that the name resolves, and that a TCP connection
to ``--port`` (ssh by default) opens; with ``--ssh`` also that passwordless ssh works
(``ssh -o BatchMode=yes host true``). Every problem is listed at once; exit status 1 if any.
"""
from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


class HostfileError(ValueError):
    """The hostfile is missing, malformed, or names hosts that cannot be reached."""


@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    line: int


def parse_hostfile(path: str | Path) -> list[Host]:
    """Hosts in DeepSpeed's hostfile format; raises HostfileError naming every bad line."""
    path = Path(path)
    if not path.is_file():
        raise HostfileError(f"hostfile {path} does not exist (DeepSpeed would silently fall back "
                            f"to the local machine)")
    hosts: list[Host] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = HOSTFILE_LINE.match(line)
        if not match:
            problems.append(f"line {number}: {raw!r} is not '<host> slots=<n>'")
            continue
        name, slots = match.group(1), int(match.group(2))
        if slots < 1:
            problems.append(f"line {number}: {name} has slots={slots}; needs >= 1")
        if name in seen:
            problems.append(f"line {number}: {name} is listed again (first on line {seen[name]})")
        seen.setdefault(name, number)
        hosts.append(Host(name, slots, number))
    if not hosts and not problems:
        problems.append("no hosts listed")
    if problems:
        raise HostfileError(f"hostfile {path}:\n  " + "\n  ".join(problems))
    return hosts


def _is_local(name: str) -> bool:
    return name in LOCAL_NAMES or name in {socket.gethostname(), socket.getfqdn()}


def host_problem(host: Host, port: int, timeout: float, ssh: bool) -> str | None:
    """Why ``host`` cannot be used, or None."""
    try:
        infos = socket.getaddrinfo(host.name, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"{host.name} (line {host.line}): name does not resolve ({e.strerror})"
    if _is_local(host.name):
        return None
    errors = []
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.settimeout(timeout)
                s.connect(address)
            break
        except OSError as e:
            errors.append(f"{address[0]}: {e.strerror or type(e).__name__}")
    else:
        return (f"{host.name} (line {host.line}): no TCP connection to port {port} within "
                f"{timeout:g} s ({'; '.join(errors)})")
    if ssh:
        result = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(timeout)}",
                                 host.name, "true"], capture_output=True, text=True)
        if result.returncode != 0:
            return (f"{host.name} (line {host.line}): passwordless ssh failed: "
                    f"{result.stderr.strip() or result.returncode}")
    return None


def check_hostfile(path: str | Path, port: int = 22, timeout: float = 3.0,
                   ssh: bool = False) -> list[Host]:
    """Parse and probe every host; raises HostfileError listing every unreachable one."""
    hosts = parse_hostfile(path)
    problems = [p for p in (host_problem(h, port, timeout, ssh) for h in hosts) if p]
    if problems:
        raise HostfileError(f"hostfile {path}: {len(problems)} of {len(hosts)} host(s) cannot be "
                            f"reached:\n  " + "\n  ".join(problems))
    return hosts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hostfile", required=True)
    ap.add_argument("--port", type=int, default=22, help="TCP port to probe (ssh: 22)")
    ap.add_argument("--timeout", type=float, default=3.0, help="seconds per host")
    ap.add_argument("--ssh", action="store_true", help="also try passwordless ssh")
    args = ap.parse_args(argv)
    try:
        hosts = check_hostfile(args.hostfile, args.port, args.timeout, args.ssh)
    except HostfileError as e:
        print(f"preflight: {e}", file=sys.stderr)
        return 1
    print(f"preflight: {len(hosts)} host(s), {sum(h.slots for h in hosts)} slot(s): "
          + ", ".join(f"{h.name}x{h.slots}" for h in hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
