"""`apppot cloud-seed`: a job for a VM that gets no kernel command line (a cloud, or any hypervisor).

The seed is a NoCloud volume: an ISO 9660 file system labelled ``cidata`` holding
``user-data`` (the job: ``#apppot-job``, then the same job file `apppot start`
writes, see apppot.protocol), ``meta-data`` (an instance id), and ``job.tar``, the
job directory's files, unpacked at /home/user/job. Attach it with an exported image
(`apppot image export`): the image's boot stage finds the volume, the agent runs
the job, its output and status go to the console (the first serial line), and the
guest powers off. The same user-data, given to a cloud's metadata service, works
without the volume (then without job.tar).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import tempfile
from pathlib import Path
from typing import NamedTuple

from apppot.errors import HostError, UsageError
from apppot.proc import run, which
from apppot.protocol import USER_DATA_MAGIC, GuestJob, render_user_data

SEED_LABEL = "cidata"
JOB_TAR = "job.tar"
USER_DATA_LIMIT = 16384  # what EC2 accepts; the seed volume has no limit, but the job should fit both
XORRISO_PACKAGE = "xorriso"


class Seed(NamedTuple):
    path: Path
    instance_id: str
    files: int  # of the job directory, in job.tar
    user_data_bytes: int


def meta_data(instance_id: str) -> bytes:
    return f"instance-id: {instance_id}\nlocal-hostname: apppot\n".encode()


def job_tar(jobdir: Path, skip: set[Path]) -> tuple[bytes, int]:
    """The job directory's regular files, directories and symlinks as a tar (owners left to the guest).

    Other kinds (sockets, devices, fifos) are refused: they cannot travel to another machine."""
    buf = io.BytesIO()
    count = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for root, dirs, files in os.walk(jobdir):
            dirs.sort()  # in place: os.walk descends in this order
            for name in dirs + sorted(files):
                path = Path(root) / name
                if path.resolve() in skip:
                    continue
                st = path.lstat()
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                    raise UsageError(f"{path} is neither a file, a directory nor a symlink; remove it or use another --jobdir")
                info = tar.gettarinfo(str(path), arcname=str(path.relative_to(jobdir)))
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                if info.isfile():
                    with path.open("rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
                count += 0 if info.isdir() else 1
    return buf.getvalue(), count


def image_reads_user_data(image: Path) -> bool:
    """Whether the image's agent takes jobs from user-data (agents before it took only the kernel command line)."""
    from apppot.images import ext4

    agent = ext4.read_file(image, "/usr/sbin/apppot-init")
    return agent is not None and USER_DATA_MAGIC.strip() in agent


def make_seed(job: GuestJob, out: Path, jobdir: Path | None, force: bool = False) -> Seed:
    """Write the NoCloud seed volume for job to out."""
    if (out.exists() or out.is_symlink()) and not force:
        raise UsageError(f"{out} exists; choose another -o or pass --force to replace it")
    xorriso = which("xorriso")
    if xorriso is None:
        raise HostError(f"xorriso is not installed, which writes the seed volume: sudo apt-get install {XORRISO_PACKAGE}")
    user_data = render_user_data(job)
    if len(user_data) > USER_DATA_LIMIT:
        raise UsageError(
            f"the job's user-data is {len(user_data)} bytes, more than the {USER_DATA_LIMIT} a metadata service takes: "
            "put the command in an apppot-run script in the job directory"
        )
    tar, files = job_tar(jobdir, {out.resolve()}) if jobdir is not None else (b"", 0)
    instance_id = "apppot-" + hashlib.sha256(user_data + tar).hexdigest()[:16]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".apppot-seed-", dir=out.parent) as tmp:
        work = Path(tmp) / "seed"
        work.mkdir()
        (work / "user-data").write_bytes(user_data)
        (work / "meta-data").write_bytes(meta_data(instance_id))
        if jobdir is not None:
            (work / JOB_TAR).write_bytes(tar)
        iso = Path(tmp) / "seed.iso"
        run([xorriso, "-as", "mkisofs", "-quiet", "-V", SEED_LABEL, "-J", "-r", "-o", str(iso), str(work)])
        iso.replace(out)
    return Seed(out, instance_id, files, len(user_data))
