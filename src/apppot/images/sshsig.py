"""OpenSSH signatures (`ssh-keygen -Y sign` / `-Y verify`): the argv AppPot runs, and the little it reads
of a signature itself.

The signature format is OpenSSH's own (PROTOCOL.sshsig: an armored SSHSIG blob); AppPot makes and
checks signatures only through ssh-keygen. It reads a signature only to say which key made it (its
fingerprint, and the allowed-signers line that would trust it) and for which namespace, and to refuse a
damaged one with a message of its own. Signatures are hostile input: size-capped, parsed with bounds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from pathlib import Path
from typing import NamedTuple

NAMESPACE = "apppot-image"  # what an AppPot signature is for: ssh-keygen refuses it for anything else
KEYGEN = "ssh-keygen"
KEYGEN_PACKAGE = "openssh-client"
SIGNATURE_LIMIT = 64 * 1024  # an RSA-16384 signature is under 6 KiB
_BEGIN = b"-----BEGIN SSH SIGNATURE-----"
_END = b"-----END SSH SIGNATURE-----"
_MAGIC = b"SSHSIG"


class DamagedSignature(Exception):
    """The bytes are not an SSH signature: why, for the message of whoever knows which file it was."""


class SshSignature(NamedTuple):
    """The parts of an SSHSIG blob AppPot reports (the signature proper is ssh-keygen's to check)."""

    public_key: bytes  # the key in SSH wire format
    namespace: str
    hash_algorithm: str

    @property
    def key_type(self) -> str:
        return _strings(self.public_key, 1)[0].decode("ascii", errors="replace")

    @property
    def fingerprint(self) -> str:
        """As ssh-keygen -l shows it: SHA256:base64, unpadded."""
        return "SHA256:" + base64.b64encode(hashlib.sha256(self.public_key).digest()).decode().rstrip("=")

    @property
    def openssh_key(self) -> str:
        """The key as an authorized_keys or allowed_signers line writes it: TYPE BASE64."""
        return f"{self.key_type} {base64.b64encode(self.public_key).decode()}"


def parse(armored: bytes) -> SshSignature:
    """The signature in ``armored`` (ssh-keygen's armored SSHSIG); DamagedSignature when it is not one."""
    if len(armored) > SIGNATURE_LIMIT:
        raise DamagedSignature(f"over {SIGNATURE_LIMIT} bytes")
    lines = armored.strip().splitlines()
    if len(lines) < 3 or lines[0].strip() != _BEGIN or lines[-1].strip() != _END:
        raise DamagedSignature("not an armored SSH signature (-----BEGIN SSH SIGNATURE-----)")
    try:
        blob = base64.b64decode(b"".join(line.strip() for line in lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise DamagedSignature("its base64 is damaged") from None
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + 4:
        raise DamagedSignature("no SSHSIG header")
    (version,) = struct.unpack_from(">I", blob, len(_MAGIC))
    if version != 1:
        raise DamagedSignature(f"SSHSIG version {version}, where ssh-keygen writes 1")
    public_key, namespace, _reserved, hash_algorithm, signature = _strings(blob[len(_MAGIC) + 4 :], 5)
    if not public_key or not signature:
        raise DamagedSignature("no key or no signature in it")
    _strings(public_key, 1)  # the key's type: a key that does not even hold one is damaged
    try:
        return SshSignature(public_key, namespace.decode("ascii"), hash_algorithm.decode("ascii"))
    except UnicodeDecodeError:
        raise DamagedSignature("its namespace or hash algorithm is not text") from None


def _strings(data: bytes, count: int) -> list[bytes]:
    """The first ``count`` SSH strings (uint32 length, bytes) of data, each checked against its end."""
    found = []
    at = 0
    for _ in range(count):
        if at + 4 > len(data):
            raise DamagedSignature("it ends early")
        (length,) = struct.unpack_from(">I", data, at)
        at += 4
        if length > len(data) - at:
            raise DamagedSignature("it ends early")
        found.append(data[at : at + length])
        at += length
    return found


def allowed_signers_line(identity: str, signature: SshSignature) -> str:
    """The allowed-signers line (ssh-keygen(1), ALLOWED SIGNERS) that trusts this key for AppPot images only."""
    return f'{identity} namespaces="{NAMESPACE}" {signature.openssh_key}'


# --- the ssh-keygen commands (pure) -------------------------------------------------------------


def sign_argv(key: Path, data_file: Path) -> list[str]:
    """Sign data_file with key (a private key, or a public key whose private half ssh-agent holds); ssh-keygen
    writes DATA_FILE.sig. A file, not stdin: without a terminal, ssh-keygen reads a passphrase from stdin."""
    return [KEYGEN, "-q", "-Y", "sign", "-f", str(key), "-n", NAMESPACE, str(data_file)]


def find_principals_argv(signers: Path, signature: Path) -> list[str]:
    """The principals of the allowed-signers file whose key made the signature, one a line."""
    return [KEYGEN, "-Y", "find-principals", "-f", str(signers), "-s", str(signature)]


def verify_argv(signers: Path, principal: str, signature: Path) -> list[str]:
    """Check the signature of the data on stdin, for this principal of the allowed-signers file, in AppPot's namespace."""
    return [KEYGEN, "-Y", "verify", "-f", str(signers), "-I", principal, "-n", NAMESPACE, "-s", str(signature)]
