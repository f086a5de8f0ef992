"""What `apppot cloud-seed` leaves out of the job directory (issue 16: following the README in one
directory packed the exported disk into a 601 MB seed, and the next seed held the earlier one)."""

from __future__ import annotations

import io
import struct
import tarfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from apppot.cow import COW_MAGIC
from apppot.submit.cloud import job_tar
from apppot.submit.seed_files import HEADER_BYTES, kind_by_header, left_out_reason


def at(offset: int, data: bytes, size: int = HEADER_BYTES) -> bytes:
    """size zero bytes with data at offset: a header as the file system would hand it over."""
    return bytes(offset) + data + bytes(max(0, size - offset - len(data)))


def ext4_superblock() -> bytes:
    sb = bytearray(1024)
    struct.pack_into("<I", sb, 0x18, 2)  # 4 KiB blocks
    sb[0x38:0x3A] = b"\x53\xef"
    return at(1024, bytes(sb))


def mbr() -> bytes:
    sector = bytearray(512)
    sector[446] = 0x80  # the first partition boots
    sector[510:512] = b"\x55\xaa"
    return bytes(sector) + bytes(HEADER_BYTES - 512)


HEADERS = {
    "a qcow2 disk image": b"QFI\xfb\x00\x00\x00\x03" + bytes(100),
    "a VMDK disk image": b"KDMV" + bytes(100),
    "a VDI disk image": b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(0x40, b"\0") + b"\x7f\x10\xda\xbe",
    "a VHD disk image": b"conectix" + bytes(100),
    "an ISO 9660 image such as a seed": at(0x8001, b"CD001"),
    "a UML copy-on-write file": struct.pack(">I", COW_MAGIC) + bytes(100),
    "an ext2/3/4 file system image": ext4_superblock(),
    "a raw disk image with an MBR": mbr(),
}


def test_every_kind_of_disk_is_known_by_its_header() -> None:
    for what, header in HEADERS.items():
        assert kind_by_header(header) == what, what
        assert left_out_reason("data.bin", header) == what


def test_a_vmdk_descriptor_and_suffixes_alone_are_left_out() -> None:
    assert kind_by_header(b"# Disk DescriptorFile\nversion=1\n") == "a VMDK disk image"
    for name in ("new.qcow2", "A.VMDK", "x.vdi", "old-seed.iso", "job.cow", "d.vhdx"):
        assert left_out_reason(name, b"") is not None, name


def test_the_jobs_own_files_are_kept() -> None:
    for name, content in [
        ("run.sh", b"#!/bin/sh\necho hi\n"),
        ("data.img", b"not a disk, only named like one"),  # .img and .raw only by their content
        ("empty.raw", b""),
        ("notes.txt", at(446, b"\x01" + bytes(63) + b"\x55\xaa")),  # the MBR signature, no partition table
        ("bytes.bin", at(1024 + 0x18, struct.pack("<I", 99) + bytes(0x1C) + b"\x53\xef")),  # ext magic, no ext block size
    ]:
        assert left_out_reason(name, content) is None, name


TEXT_SIGNATURES = (b"# Disk DescriptorFile", b"KDMV", b"conectix", b"vhdxfile")  # signatures made of text


@given(st.text(max_size=HEADER_BYTES))
def test_text_files_are_never_taken_for_disks(text: str) -> None:
    """A text file (what a job's scripts and data mostly are) is kept, whatever it says."""
    header = text.encode()[:HEADER_BYTES]
    if not header.startswith(TEXT_SIGNATURES) and header[0x8001:0x8006] != b"CD001":
        assert kind_by_header(header) is None


def test_the_job_tar_names_what_it_left_out(tmp_path: Path) -> None:
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    (tmp_path / "app.qcow2").write_bytes(HEADERS["a qcow2 disk image"])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "old.bin").write_bytes(HEADERS["an ISO 9660 image such as a seed"])
    (tmp_path / ".apppot-seed-x1y2").mkdir()  # what a killed cloud-seed left
    (tmp_path / ".apppot-seed-x1y2" / "job.tar").write_bytes(b"partial")
    out = io.BytesIO()
    packed = job_tar(tmp_path, out, set())
    assert packed.files == 1
    assert [(str(o.path), o.what, o.size) for o in packed.left_out] == [
        ("app.qcow2", "a qcow2 disk image", len(HEADERS["a qcow2 disk image"])),
        ("sub/old.bin", "an ISO 9660 image such as a seed", HEADER_BYTES),
    ]
    out.seek(0)
    with tarfile.open(fileobj=out) as t:
        assert sorted(t.getnames()) == ["run.sh", "sub"]
