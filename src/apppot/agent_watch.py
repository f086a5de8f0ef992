"""The guest's first sign of life: AppPot's agent announces itself in the report directory as soon
as it has mounted it. A guest that has not within the boot timeout (an init= that never starts the
agent, a boot stuck before it) is ended with 122, instead of being waited for forever."""

from __future__ import annotations

import time
from collections.abc import Callable

from apppot.channel import Channel
from apppot.errors import GuestDied
from apppot.protocol import AGENT_FILE, STATUS_FILE


class AgentWatch:
    """Checked on each turn of the supervision loop, from the start of the hypervisor."""

    def __init__(self, channel: Channel, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.channel = channel
        self.timeout_s = timeout_s
        self.clock = clock
        self.deadline = clock() + timeout_s
        self.started = False

    def check(self) -> None:
        """Raises GuestDied once the deadline has passed without the agent's announcement."""
        if self.started:
            return
        for name in (AGENT_FILE, STATUS_FILE):  # an agent that fails at once reports only a status
            if self.channel.has_report(name):
                self.channel.read_report(name)  # a link, a pipe or a huge file there ends the job now
                self.started = True
                return
        if self.clock() > self.deadline:
            raise GuestDied(
                f"AppPot's agent did not start in the guest within {self.timeout_s:g} s (was init= replaced with "
                "--extra, or is the boot stuck? see --console-log): the guest was stopped; "
                "give a slow boot more time with --boot-timeout SECONDS"
            )
