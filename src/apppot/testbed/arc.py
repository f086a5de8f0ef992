"""An ARC compute element on this machine, in front of the test Slurm cluster (apppot testbed up --arc USER).

A-REX (Debian's nordugrid-arc-arex) with a test CA, a host certificate for localhost, USER as the
grid user (certificate in ~USER/.globus, mapped to the local account USER, a proxy made for it),
AppPot's APPPOT-0 runtime environment (also under the seed's names, TEST/APPPOT-0 and
ENV/APPPOT-0.21) pointing at the testbed's copy of AppPot, and Slurm as the batch system.
Endpoint: https://localhost:8443/arex (REST), loopback only.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import stat
import subprocess
import time
from pathlib import Path

from apppot.errors import HostError
from apppot.proc import run, which
from apppot.testbed.daemons import Daemon, is_daemon, listening, read_pid_file

PORT = 8443
ENDPOINT = f"https://localhost:{PORT}/arex"
PACKAGES = "nordugrid-arc-arex nordugrid-arc-client nordugrid-arc-arcctl nordugrid-arc-plugins-arcrest"
RTE_NAME = "APPS/APPPOT-0"
# The names the seed's sites published it under, which existing job descriptions name.
SEED_RTE_NAMES = ("TEST/APPPOT-0", "ENV/APPPOT-0.21")
RTE_NAMES = (RTE_NAME, *SEED_RTE_NAMES)
CA_ID = "apppot-testbed"
# How often (in tenths of a second) A-REX's information provider runs: it is where clients learn job
# states. The packaged default, 600 (a minute), makes every status change take a minute to show.
INFOPROVIDER_PERIOD = 50
_TEMPORARY = re.compile(r"arex\.xml\.[A-Za-z0-9]{6,}")  # mktemp -t arex.xml.XXXXXX


def render_arc_conf(directory: Path, slurm_conf: Path, user: str) -> str:
    """arc.conf for A-REX on localhost with Slurm, one authorised grid user mapped to USER."""
    d = directory
    return f"""\
# AppPot's test CE; written by apppot testbed up --arc
[common]
hostname = localhost
x509_host_key = {d}/ca/host-localhost-key.pem
x509_host_cert = {d}/ca/host-localhost-cert.pem
x509_cert_dir = /etc/grid-security/certificates

[authgroup: apppot]
file = /etc/grid-security/testCA.allowed-subjects

[mapping]
map_to_user = apppot {user}:{user}

[lrms]
lrms = slurm
slurm_bin_path = /usr/bin
slurm_wakeupperiod = 2
slurm_use_sacct = no
defaultmemory = 512

[arex]
controldir = {d}/var/control
sessiondir = {d}/var/session
runtimedir = {d}/rte
logfile = {d}/log/arex.log
joblog = {d}/log/arex-jobs.log
helperlog = {d}/log/job.helper.errors
pidfile = {d}/run/arex.pid
loglevel = 3
wakeupperiod = 2

[arex/ws]
wsurl = {ENDPOINT}
logfile = {d}/log/ws-interface.log
pidfile = {d}/run/arex-ws.pid

[arex/ws/jobs]
allowaccess = apppot

[infosys]
logfile = {d}/log/infoprovider.log

[infosys/glue2]

[infosys/cluster]

[queue:apppot]
# slurm.conf: {slurm_conf}
"""


def check_host(user: str) -> pwd.struct_passwd:
    """ARC's programs are installed and user is an account; returns it."""
    missing = [p for p in ("arcctl", "arcsub", "arcproxy") if which(p) is None]
    if missing or not Path("/usr/share/arc/arc-arex-start").exists():
        raise HostError(f"ARC is not installed: sudo apt-get install {PACKAGES}")
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise HostError(f"there is no local account {user} to be the grid user; give an existing one") from None


def set_rte_params(directory: Path, params: dict[str, str]) -> None:
    """Set parameters of the APPPOT RTE under each of its names, as `arcctl rte params-set` would (a
    file per name lists every parameter the RTE declares, each NAME="value"; submit_common.sh sources
    it before the RTE)."""
    declared = re.findall(r"^# param:([A-Z_]+):[^:]*:([^:]*):", rte_file(directory).read_text(), re.MULTILINE)
    for value in params.values():
        if any(c in value for c in '"$`\\\n'):
            raise HostError(f"the RTE parameter {value!r} holds characters a shell would interpret; give a plain path")
    for name in RTE_NAMES:
        current = dict(declared)
        current.update(_read_params(directory, name))
        current.update(params)
        target = rte_params_file(directory, name)
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        target.write_text("".join(f'{key}="{value}"\n' for key, value in current.items()))


def rte_file(directory: Path, name: str = RTE_NAME) -> Path:
    return directory / "rte" / name


def rte_params_file(directory: Path, name: str = RTE_NAME) -> Path:
    return directory / "var" / "control" / "rte" / "params" / name


def _read_params(directory: Path, name: str) -> dict[str, str]:
    try:
        text = rte_params_file(directory, name).read_text()
    except FileNotFoundError:
        return {}
    return dict(re.findall(r'^([A-Z_]+)="(.*)"$', text, re.MULTILINE))


def enable_rte(directory: Path) -> None:
    """Install the APPPOT RTE and enable it under each of its names, as `arcctl rte enable` would (a
    link in the control directory to the file in runtimedir); the seed's names are links in runtimedir.
    Not arcctl itself: it finds RTEs by stripping the runtime directory's characters, not its prefix,
    from their paths, so it loses RTEs under a directory whose path holds A, P or S."""
    publish_rte(directory, RTE_NAME, (Path(__file__).parent.parent / "data" / "rte" / "APPPOT-0").read_text())
    for alias in SEED_RTE_NAMES:
        link = rte_file(directory, alias)
        link.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(rte_file(directory))
        _enable(directory, alias)


def publish_rte(directory: Path, name: str, script: str) -> None:
    """As the site's administrator: an RTE script NAME in runtimedir (say, an application's, which
    exports where its image is), enabled."""
    source = rte_file(directory, name)
    source.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    source.write_text(script)
    source.chmod(0o644)
    _enable(directory, name)


def _enable(directory: Path, name: str) -> None:
    link = directory / "var" / "control" / "rte" / "enabled" / name
    link.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.realpath(rte_file(directory, name)))


def temporary_configurations(directory: Path) -> list[Path]:
    """The configuration files A-REX's start scripts wrote for the running arched (mktemp -t, in /tmp:
    A-REX's validator wants its tmpdir world-writable, which the testbed's directory must not be), read
    from the command line of each daemon its pid file names, if that is arched run by root."""
    found = []
    for daemon in daemons(directory):
        pid = read_pid_file(daemon.pid_file, 0)
        if not isinstance(pid, int) or is_daemon(pid, daemon.program, 0) is not None:
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for flag, value in itertools.pairwise(argv):
            path = Path(os.fsdecode(value))
            if flag == b"-c" and path.is_absolute() and _TEMPORARY.fullmatch(path.name):
                found.append(path)
    return found


def remove_temporary_configurations(paths: list[Path]) -> None:
    """Remove what temporary_configurations found, if each is still a regular file of root's."""
    for path in paths:
        with contextlib.suppress(OSError):
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_uid == 0:
                path.unlink()


def daemons(directory: Path) -> list[Daemon]:
    """A-REX's two daemons (web service first), by their pid files."""
    return [Daemon(name, directory / "run" / f"{name}.pid", "arched") for name in ("arex-ws", "arex")]


def up(directory: Path, slurm_conf: Path, site: Path, user: str, timeout: float = 90) -> float:
    """Start the CE; returns how long it took until the endpoint listened and the user had a proxy."""
    started = time.monotonic()
    account = check_host(user)
    if listening(PORT):
        raise HostError(f"port {PORT} is taken (another A-REX?); stop it first (apppot testbed down)")
    for sub in ("ca", "rte", "var/control", "var/session", "log", "run"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(directory / "var" / "session", 0o755)
    # A test CA of our own, named: arcctl derives the default name from the host name it finds in the
    # configuration A-REX last ran with, so the package's own test CA is not always the one it finds.
    test_ca = ["arcctl", "test-ca", "--ca-id", CA_ID]
    if not Path(f"/etc/grid-security/certificates/ARC-TestCA-{CA_ID}.pem").exists():
        run([*test_ca, "init"])
    run([*test_ca, "hostcert", "-n", "localhost", "-f"], cwd=directory / "ca")
    run([*test_ca, "usercert", "-i", user, "-f"])
    conf = directory / "arc.conf"
    conf.write_text(render_arc_conf(directory, slurm_conf, user))
    env = {**os.environ, "ARC_CONFIG": str(conf), "SLURM_CONF": str(slurm_conf)}
    enable_rte(directory)
    set_rte_params(
        directory,
        {
            "APPPOT_START": str(site / "bin" / "apppot-start"),
            "APPPOT_IMAGE": str(site / "images" / "tiny.img"),
            "APPPOT_KERNEL": str(site / "kernel" / "linux"),
        },
    )
    dhparam = directory / "var" / "control" / "dhparam.pem"
    if not dhparam.exists():  # otherwise A-REX computes 4096-bit parameters for minutes
        run(["openssl", "genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt", "group:ffdhe4096", "-out", str(dhparam)])
    # Copies of A-REX's two start scripts: the job manager with a shorter information-provider period,
    # the web service listening on loopback only.
    gm_marker = "<arex:gmconfig>$ARC_RUNTIME_CONFIG</arex:gmconfig>"
    period = f"{gm_marker}\n      <arex:InfoproviderWakeupPeriod>{INFOPROVIDER_PERIOD}</arex:InfoproviderWakeupPeriod>"
    ws_marker = "<tcp:Listen><tcp:Port>$arex_port</tcp:Port></tcp:Listen>"
    loopback = "<tcp:Listen><tcp:Interface>127.0.0.1</tcp:Interface><tcp:Port>$arex_port</tcp:Port></tcp:Listen>"
    for script, marker, replacement in (("arc-arex-start", gm_marker, period), ("arc-arex-ws-start", ws_marker, loopback)):
        packaged = Path("/usr/share/arc", script).read_text()
        if marker not in packaged:
            raise HostError(f"this A-REX's {script} is not the one AppPot knows (ARC 6.x); start A-REX yourself")
        copy = directory / script
        copy.write_text(packaged.replace(marker, replacement))
        copy.chmod(0o755)
        run([str(copy)], env=env)
    while not listening(PORT):
        if time.monotonic() - started > timeout:
            raise HostError(f"A-REX did not listen on port {PORT} in {timeout:.0f} s; see {directory / 'log'}")
        time.sleep(0.3)
    # The grid user's proxy, as the user (it lands in /tmp/x509up_uUID).
    proc = subprocess.run(
        [which("runuser") or "/usr/sbin/runuser", "-u", user, "--", "arcproxy"],
        capture_output=True,
        text=True,
        env={"HOME": account.pw_dir, "PATH": "/usr/bin:/bin"},
        cwd=account.pw_dir if os.path.isdir(account.pw_dir) else "/",  # not root's, which it may not enter
        check=False,
    )
    if proc.returncode != 0:
        raise HostError(f"arcproxy for {user} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return time.monotonic() - started
