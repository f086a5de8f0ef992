"""Keys typed while an interactive guest boots, held by the host until the guest can take them.

QEMU reads its stdin as soon as it starts, into an emulated serial port that the guest's driver resets
when the line is first opened: what was typed before that was lost, and what the host's terminal
echoed in its cooked mode showed on the screen. So the terminal is made raw by AppPot before QEMU
starts (no echo, no line editing), QEMU reads a pipe instead of the terminal, and the keys go into that
pipe only once the agent has announced itself, which it does after it has opened the guest's terminal
and holds it open (apppot-init). Until then they wait in the terminal's own input queue, and Ctrl-C is
still a signal that ends AppPot (and the boot), not a key held back for the job; once the keys are
released the terminal is fully raw, as QEMU's stdio would make it: Ctrl-C is a byte for the job.
The runner restores the modes on every ending it lives to see; after SIGKILL of AppPot a job-control
shell restores them itself (bash, zsh), else `stty sane` does: a helper process that outlives AppPot to
restore them would race the shell's own restoring, and is not worth it.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from typing import Any


def make_raw(fd: int, *, isig: bool = False) -> None:
    """The terminal modes QEMU's stdio character device sets (with signal=off); output processing stays.
    With ``isig`` Ctrl-C still sends SIGINT (AppPot ends, cleanly); Ctrl-\\ and Ctrl-Z, which would kill
    or stop AppPot without stopping the guest, are plain keys."""
    import termios

    with contextlib.suppress(termios.error, OSError):
        attrs: list[Any] = termios.tcgetattr(fd)
        iflag, oflag, cflag, lflag = attrs[0], attrs[1], attrs[2], attrs[3]
        iflag &= ~(
            termios.IGNBRK
            | termios.BRKINT
            | termios.PARMRK
            | termios.ISTRIP
            | termios.INLCR
            | termios.IGNCR
            | termios.ICRNL
            | termios.IXON
        )
        oflag |= termios.OPOST
        lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN | (0 if isig else termios.ISIG))
        cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
        attrs[0:4] = [iflag, oflag, cflag, lflag]
        attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0
        if isig:
            attrs[6][termios.VQUIT] = attrs[6][termios.VSUSP] = b"\0"  # _POSIX_VDISABLE on Linux
        termios.tcsetattr(fd, termios.TCSANOW, attrs)


class HeldKeys:
    """The pipe QEMU reads as its stdin, fed from the terminal ``tty_fd`` once ``release()`` is called."""

    def __init__(self, tty_fd: int) -> None:
        self.tty_fd = tty_fd
        self.read_end, self._write_end = os.pipe()  # both close-on-exec; the runner hands read_end to QEMU
        self._released = threading.Event()
        threading.Thread(target=self._relay, name="apppot-keys", daemon=True).start()

    def release(self) -> None:
        """The guest can take keys: Ctrl-C is one of them from now on (see make_raw)."""
        if not self._released.is_set():
            make_raw(self.tty_fd)
            self._released.set()

    def _relay(self) -> None:
        self._released.wait()
        # Ends when QEMU has gone (EPIPE) or the terminal has (EOF, EIO); a daemon thread: AppPot's exit
        # does not wait for a key that will never be typed. QEMU makes its stdout non-blocking, and that
        # is often the very terminal this reads: wait for a key, then read.
        with contextlib.suppress(OSError):
            while True:
                select.select([self.tty_fd], [], [])
                try:
                    data = os.read(self.tty_fd, 4096)
                except BlockingIOError:
                    continue
                if not data:
                    break
                view = memoryview(data)
                while view:
                    view = view[os.write(self._write_end, view) :]
        with contextlib.suppress(OSError):
            os.close(self._write_end)
