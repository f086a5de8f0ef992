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
import os
import stat
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO, NamedTuple

from apppot.errors import HostError, UsageError
from apppot.proc import run, which
from apppot.protocol import USER_DATA_MAGIC, GuestJob, render_user_data
from apppot.submit.seed_files import HEADER_BYTES, TEMP_PREFIX, LeftOut, left_out_reason

SEED_LABEL = "cidata"
JOB_TAR = "job.tar"
USER_DATA_LIMIT = 16384  # what EC2 accepts; the seed volume has no limit, but the job should fit both
XORRISO_PACKAGE = "xorriso"


class Seed(NamedTuple):
    path: Path
    instance_id: str
    files: int  # of the job directory, in job.tar
    user_data_bytes: int
    size: int  # of the seed volume
    left_out: list[LeftOut]  # the job directory's disk images, seeds and COW files


class JobFiles(NamedTuple):
    files: int  # files and links packed (directories not counted)
    left_out: list[LeftOut]


def meta_data(instance_id: str) -> bytes:
    return f"instance-id: {instance_id}\nlocal-hostname: apppot\n".encode()


def _open_member(path: Path) -> int:
    """A descriptor on the job directory's regular file path, never through a link nor blocking on a FIFO."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}; make it readable, remove it or use another --jobdir") from None


def job_tar(jobdir: Path, out: BinaryIO, skip: set[Path]) -> JobFiles:
    """Write the job directory's regular files, directories and symlinks to out as a tar (owners left to
    the guest), without the paths in skip and the disk images, seeds and COW files it holds (seed_files).

    Other kinds (sockets, devices, fifos) are refused: they cannot travel to another machine."""
    count = 0
    left_out: list[LeftOut] = []
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for root, dirs, files in os.walk(jobdir):
            dirs[:] = sorted(d for d in dirs if not (d.startswith(TEMP_PREFIX) or (Path(root) / d).resolve() in skip))
            for name in dirs + sorted(files):
                path = Path(root) / name
                if path.resolve() in skip:
                    continue
                st = path.lstat()
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                    raise UsageError(f"{path} is neither a file, a directory nor a symlink; remove it or use another --jobdir")
                arcname = str(path.relative_to(jobdir))
                if not stat.S_ISREG(st.st_mode):
                    info = tar.gettarinfo(str(path), arcname=arcname)
                    info.uid = info.gid = 0
                    info.uname = info.gname = "root"
                    tar.addfile(info)
                    count += 0 if info.isdir() else 1
                    continue
                with os.fdopen(_open_member(path), "rb") as f:
                    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # replaced since the walk saw it
                        raise UsageError(f"{path} changed while it was packed; pack the job directory again")
                    reason = left_out_reason(name, os.pread(f.fileno(), HEADER_BYTES, 0))
                    if reason is not None:
                        left_out.append(LeftOut(Path(arcname), reason, os.fstat(f.fileno()).st_size))
                        continue
                    info = tar.gettarinfo(arcname=arcname, fileobj=f)
                    info.uid = info.gid = 0
                    info.uname = info.gname = "root"
                    tar.addfile(info, f)
                    count += 1
    return JobFiles(count, left_out)


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
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX, dir=out.parent) as tmp:
        work = Path(tmp) / "seed"
        work.mkdir()
        digest = hashlib.sha256(user_data)
        packed = JobFiles(0, [])
        if jobdir is not None:
            # Written where the seed is made, not in memory: a job directory may be large.
            with (work / JOB_TAR).open("w+b") as tar:
                packed = job_tar(jobdir, tar, {out.resolve(), Path(tmp).resolve()})
                tar.seek(0)
                while chunk := tar.read(1 << 20):
                    digest.update(chunk)
        instance_id = "apppot-" + digest.hexdigest()[:16]
        (work / "user-data").write_bytes(user_data)
        (work / "meta-data").write_bytes(meta_data(instance_id))
        iso = Path(tmp) / "seed.iso"
        run([xorriso, "-as", "mkisofs", "-quiet", "-V", SEED_LABEL, "-J", "-r", "-o", str(iso), str(work)])
        size = iso.stat().st_size
        iso.replace(out)
    return Seed(out, instance_id, packed.files, len(user_data), size, packed.left_out)
