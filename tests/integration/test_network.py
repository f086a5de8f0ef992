"""The guest's network: outbound NAT only, closed to the host's loopback and namespace (issue 13).

Nothing here leaves the machine: the "outside" is a network namespace the test makes (as root), joined
to the host by a veth pair, with an HTTP server and a DNS server in it. The NAT helper forwards the
guest's DNS to the resolver in /etc/resolv.conf, so the jobs run in a private mount namespace where
that file names the test's resolver.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import APPPOT, chown_to
from tests.integration.conftest import BOTH_BACKENDS

pytestmark = pytest.mark.uml

NAME = "probe.apppot.test"  # resolved only by the test's own DNS server
BODY = b"hello-from-outside\n"
LOOPBACK_BODY = b"hello-from-host-loopback\n"

# An HTTP server (port 8080) and a DNS server answering every A query with the namespace's address.
SERVER = r"""
import http.server, socket, struct, sys, threading
addr, body = sys.argv[1], sys.argv[2].encode() + b"\n"

class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

def dns():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, 53))
    while True:
        query, peer = s.recvfrom(512)
        end = 12
        while query[end]:
            end += query[end] + 1
        question = query[12:end + 5]
        qtype = struct.unpack("!H", query[end + 1:end + 3])[0]
        answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(addr) if qtype == 1 else b""
        header = query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1 if answer else 0, 0, 0)
        s.sendto(header + question + answer, peer)

server = http.server.HTTPServer((addr, 8080), Hello)
threading.Thread(target=dns, daemon=True).start()
print("ready", flush=True)
server.serve_forever()
"""


class Outside(NamedTuple):
    address: str  # of the server, in its namespace
    resolv_conf: Path  # names the test's resolver


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outside]:
    """A network namespace with an HTTP and a DNS server, routed from the host through a veth pair."""
    if os.getuid() != 0 or shutil.which("ip") is None:
        pytest.skip("the test network needs root and iproute2")
    tag = os.getpid() % 100_000
    subnet = 16 + os.getpid() % 200  # 10.213.N.0/30: parallel sessions do not share routes
    host_addr, ns_addr = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
    ns, host_if, ns_if = f"apppot-nt{tag}", f"apnt{tag}h", f"apnt{tag}n"
    directory = tmp_path_factory.mktemp("outside")
    script = directory / "server.py"
    script.write_text(SERVER)
    resolv = directory / "resolv.conf"
    resolv.write_text(f"nameserver {ns_addr}\n")
    os.chmod(directory, 0o755)
    resolv.chmod(0o644)
    setup = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
        ["ip", "link", "set", ns_if, "netns", ns],
        ["ip", "addr", "add", f"{host_addr}/30", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "-n", ns, "addr", "add", f"{ns_addr}/30", "dev", ns_if],
        ["ip", "-n", ns, "link", "set", ns_if, "up"],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
    ]
    server: subprocess.Popen[bytes] | None = None
    try:
        for argv in setup:
            subprocess.run(argv, check=True, capture_output=True)
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(script), ns_addr, BODY.decode().strip()],
            stdout=subprocess.PIPE,
        )
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        yield Outside(ns_addr, resolv)
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", host_if], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def with_resolver(outside: Outside) -> list[str]:
    """Runs the rest of the command line in a private mount namespace whose /etc/resolv.conf is the test's."""
    mount = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(outside.resolv_conf)]


@pytest.fixture
def loopback_server() -> Iterator[int]:
    """An HTTP server on the host's 127.0.0.1 only; its port."""

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(LOOPBACK_BODY)))
            self.end_headers()
            self.wfile.write(LOOPBACK_BODY)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def user_jobdir(tmp_path: Path, user: str | None) -> Path:
    jobdir = tmp_path / f"job-{user or 'root'}"
    jobdir.mkdir()
    if user is not None:
        chown_to(jobdir, user)
    return jobdir


# busybox's wget -T crashes (1.35, static): timeout bounds it instead.
FETCH = "timeout 10 wget -q -O - http://{}/"


@BOTH_BACKENDS
@pytest.mark.parametrize("as_test_user", [False, True], ids=["root", "user"])
def test_outbound_tcp_and_name_resolution_work(
    apppot, backend: str, outside: Outside, tmp_path: Path, as_test_user: bool, request: pytest.FixtureRequest
) -> None:
    user = request.getfixturevalue("test_user") if as_test_user else None
    jobdir = user_jobdir(tmp_path, user)
    script = f"nslookup {NAME} 10.0.2.3; {FETCH.format(f'{NAME}:8080')}"
    r = apppot(["start", "--net", "--", "sh", "-c", script], cwd=jobdir, as_user=user, prefix=with_resolver(outside))
    assert r.returncode == 0, r.err
    assert outside.address.encode() in r.stdout and r.stdout.endswith(BODY), r.stdout


@BOTH_BACKENDS
@pytest.mark.parametrize("as_test_user", [False, True], ids=["root", "user"])
def test_host_loopback_is_closed_unless_asked_for(
    apppot, backend: str, loopback_server: int, tmp_path: Path, as_test_user: bool, request: pytest.FixtureRequest
) -> None:
    user = request.getfixturevalue("test_user") if as_test_user else None
    jobdir = user_jobdir(tmp_path, user)
    fetch = FETCH.format(f"10.0.2.2:{loopback_server}")
    # Neither the job's user nor root inside reaches it; the guest's own network works.
    closed = f"{fetch} || echo closed; id -un; ip route | grep -q 'default via 10.0.2.2' && echo routed"
    # (Host root's job runs as root inside in any case.)
    for guest_user, name in (([], b"root" if user is None else b"user"), (["--user", "root"], b"root")):
        r = apppot(["start", "--net", *guest_user, "--", "sh", "-c", closed], cwd=jobdir, as_user=user)
        assert (r.returncode, r.stdout) == (0, b"closed\n" + name + b"\nrouted\n"), (guest_user, r.stdout, r.err)
    r = apppot(["start", "--host-loopback", "--", "sh", "-c", fetch], cwd=jobdir, as_user=user)
    assert (r.returncode, r.stdout) == (0, LOOPBACK_BODY), r.err


def _children(pid: int) -> list[int]:
    """All descendants of pid, parents before their children."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop(0)
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in (task / "children").read_text().split()]
                found += kids
                todo += kids
    return found


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class RunningJob(NamedTuple):
    apppot: subprocess.Popen[bytes]
    hypervisor: int  # UML's or QEMU's pid
    helper: int  # the NAT helper's
    processes: list[int]  # all that AppPot started (UML starts a vde_plug of its own, in its sandbox)


@contextlib.contextmanager
def running_job(jobdir: Path, cache: Path, backend: str) -> Iterator[RunningJob]:
    """`apppot start --net` with a job that waits until the test removes `hold` from the job directory."""
    hold = jobdir / "hold"
    hold.touch()
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    script = "while [ -e hold ]; do sleep 0.1; done"
    proc = subprocess.Popen([APPPOT, "start", "--net", "--", "sh", "-c", script], cwd=jobdir, env=env, stderr=subprocess.PIPE)
    try:
        hypervisor = helper = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (hypervisor and helper):
            time.sleep(0.5)  # until the hypervisor has started, and UML its own helpers
            processes = _children(proc.pid)
            helpers = [p for p in processes if any(a.startswith("switch://") for a in _cmdline(p)) and "vde_plug" in _exe(p)]
            if backend == "qemu":
                hypervisors = [p for p in processes if "qemu-system" in _exe(p)]
            else:  # the first UML process (the others are its threads' processes)
                hypervisors = [p for p in processes if Path(_cmdline(p)[0]).name == "linux"]
            hypervisor, helper = hypervisors[0] if hypervisors else 0, helpers[0] if helpers else 0
        assert hypervisor and helper, (hypervisor, helper)
        yield RunningJob(proc, hypervisor, helper, processes)
    finally:
        hold.unlink(missing_ok=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        proc.kill()
        proc.wait()


@BOTH_BACKENDS
def test_the_hypervisor_has_its_own_network_namespace(apppot, backend: str, jobdir: Path, cache_home: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("entering another process's network namespace needs root")
    # A service on a host abstract socket, like a session bus or X11.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"\0apppot-test-{os.getpid()}"
    listener.bind(name)
    listener.listen()
    try:
        with running_job(jobdir, cache_home, backend) as job:
            ns = os.readlink(f"/proc/{job.hypervisor}/ns/net")
            assert ns != os.readlink("/proc/self/ns/net")
            # The helper stays in the host's namespace: it is the way out.
            assert os.readlink(f"/proc/{job.helper}/ns/net") == os.readlink("/proc/self/ns/net")
            connect = f"import socket; socket.socket(socket.AF_UNIX).connect({name!r})"
            inside = subprocess.run(
                ["nsenter", f"--net=/proc/{job.hypervisor}/ns/net", sys.executable, "-c", connect], capture_output=True
            )
            assert inside.returncode != 0 and b"ConnectionRefusedError" in inside.stderr, inside.stderr
            outside = subprocess.run([sys.executable, "-c", connect], capture_output=True)
            assert outside.returncode == 0, outside.stderr  # the probe itself works
    finally:
        listener.close()


@BOTH_BACKENDS
def test_the_helper_ends_with_apppot_even_when_it_is_killed(apppot, backend: str, jobdir: Path, cache_home: Path) -> None:
    with running_job(jobdir, cache_home, backend) as job:
        job.apppot.send_signal(signal.SIGKILL)
        job.apppot.wait()

        def alive() -> list[int]:  # a zombie has no exe: it has ended
            return [p for p in job.processes if _exe(p)]

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and alive():
            time.sleep(0.1)
        assert alive() == [], [_cmdline(p) for p in alive()]


def test_host_loopback_needs_the_network(apppot, jobdir: Path) -> None:
    r = apppot(["start", "--no-net", "--host-loopback", "--", "true"], cwd=jobdir)
    assert r.returncode == 125
    assert r.err.count("\n") == 1 and "--host-loopback" in r.err and "--no-net" in r.err, r.err


@BOTH_BACKENDS
def test_without_namespaces_the_loopback_stays_closed_and_the_warning_says_what_is_lost(
    apppot, backend: str, loopback_server: int, jobdir: Path
) -> None:
    env = {"APPPOT_BWRAP": "/nonexistent/bwrap"}
    closed = f"{FETCH.format(f'10.0.2.2:{loopback_server}')} || echo closed"
    r = apppot(["start", "-v", "--net", "--", "sh", "-c", closed], cwd=jobdir, env=env)  # -v: said every time
    assert (r.returncode, r.stdout) == (0, b"closed\n"), r.err
    assert "reduced isolation" in r.err and "abstract sockets and loopback services" in r.err
    r = apppot(["start", "--isolation", "strict", "--net", "--", "true"], cwd=jobdir, env=env)
    assert r.returncode == 125 and "--isolation strict" in r.err


# --- the guest's own loopback (issue 16) ----------------------------------------------------------

# A job that talks to itself over 127.0.0.1: a listener and a client of busybox nc (a listener on a
# down loopback would wait for ever: timeout ends it). The client retries until the listener is up.
# busybox nc's listener, its stdin at EOF, now and then ends a connection without writing what it got
# (measured: 1 in 8; got stays empty while the client succeeded): the exchange is tried again, which a
# loopback that is down fails every time.
TALK_TO_ITSELF = (
    "for try in 1 2 3 4 5; do timeout 5 nc -l -p 7777 >got & "
    "for i in $(seq 25); do echo hello-over-lo | nc 127.0.0.1 7777 2>/dev/null && break; sleep 0.2; done; "
    "wait; [ -s got ] && break; done; cat got"
)
# The same with python3, for Debian appliances (no nc, no ip, no ifconfig in debian-dev).
PYTHON_TALKS_TO_ITSELF = (
    "import socket; s = socket.create_server(('127.0.0.1', 0)); c = socket.create_connection(s.getsockname(), 10); "
    "a, _ = s.accept(); c.sendall(b'hello-over-lo'); print(a.recv(64).decode())"
)


@BOTH_BACKENDS
@pytest.mark.parametrize("net", ["--net", "--no-net"])
def test_the_guests_loopback_is_up_with_and_without_network(apppot, backend: str, net: str, jobdir: Path) -> None:
    r = apppot(["start", net, "--", "sh", "-c", TALK_TO_ITSELF], cwd=jobdir, timeout=180)
    assert (r.returncode, r.stdout) == (0, b"hello-over-lo\n"), r.err


@BOTH_BACKENDS
def test_a_debian_appliances_loopback_is_up_without_network(
    apppot, backend: str, debian_dev: dict[str, object], jobdir: Path, test_user: str
) -> None:
    """debian-dev has neither ip nor ifconfig: the agent brings lo up with what every kernel has."""
    chown_to(jobdir, test_user)
    argv = ["start", "--image", str(debian_dev["path"]), "--no-net", "--", "python3", "-c", PYTHON_TALKS_TO_ITSELF]
    r = apppot(argv, cwd=jobdir, as_user=test_user, timeout=300)
    assert (r.returncode, r.stdout) == (0, b"hello-over-lo\n"), r.err
