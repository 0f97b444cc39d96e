"""What a session arriving from a paired machine may be here: the receiver's own rules, not the sender's.

Pairing means "this machine may send me sessions and see the screens of the sessions it sent me", nothing more.
A session's config comes from the sender (migrate-in's ``config``, a sent checkpoint's ``meta``), so before it
becomes a QEMU command line here it is rebuilt by these rules:

- its name is a valid session name, and it takes the place of a session here only if that one came from the
  same peer or went to it (a migration back), and is not running;
- it boots a kernel, initrd or ISO only from this home's demo guest or the directories in the
  ``arrivals_boot_dirs`` setting (a path elsewhere, such as /etc/passwd as an "ISO", is refused);
- it has no listener of the sender's choosing (``vnc_tcp`` is dropped) and no base image of ours;
- it gets at most ``arrivals_max_memory_mib`` of memory and ``arrivals_max_cpus`` CPUs (default: three quarters
  of this machine's memory, all of its cores).

Every refusal is one sentence, which the sender sees.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..errors import PeerError, UsageError
from ..local.sessions import Session, SessionConfig
from ..local.settings import Settings
from ..paths import Home
from .identity import installation_name

DEMO_GUEST = "testguest"  # this home's demo guest: cache/testguest (engine.demo)


@dataclasses.dataclass(frozen=True)
class ArrivalRules:
    boot_dirs: tuple[Path, ...]
    max_memory_mib: int
    max_cpus: int

    @classmethod
    def of(cls, home: Home) -> ArrivalRules:
        settings = Settings.load(home)
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
        return cls(
            boot_dirs=tuple(Path(d).resolve() for d in [str(home.cache / DEMO_GUEST), *settings.arrivals_boot_dirs]),
            max_memory_mib=settings.arrivals_max_memory_mib or memory * 3 // 4,
            max_cpus=settings.arrivals_max_cpus or os.cpu_count() or 1,
        )

    def config(self, fields: object, peer: str) -> SessionConfig:
        """The config of a session from ``peer`` (as it sent it) as it may run here; UsageError (one sentence) if it
        may not, PeerError if it is malformed."""
        try:
            config = SessionConfig.from_json(fields)
        except ValueError:
            raise PeerError("The session's settings that arrived were malformed; use the same version of "
                            "session-manager on both computers.") from None
        here = installation_name()
        if config.memory_mib > self.max_memory_mib or not 1 <= config.cpus <= self.max_cpus:
            raise UsageError(f"Session {config.name!r} wants {config.memory_mib} MiB and {config.cpus} CPUs, more than "
                             f"{here} gives a session from {peer} ({self.max_memory_mib} MiB, {self.max_cpus} CPUs: "
                             "arrivals_max_memory_mib and arrivals_max_cpus in its settings.toml).")
        for label, path in (("kernel", config.kernel), ("initrd", config.initrd), ("ISO", config.iso)):
            if path is None:
                continue
            real = Path(path).resolve()
            if not any(real.is_relative_to(d) for d in self.boot_dirs) or not real.is_file():
                raise UsageError(f"Session {config.name!r} boots from the {label} {path}, which {here} does not let a "
                                 f"session from {peer} use; put it in a directory listed in arrivals_boot_dirs (its "
                                 "settings.toml), or send a session that boots from its disk.")
        return dataclasses.replace(config, vnc_tcp=None, base_image=None, base_format=None)


def check_replaceable(session: Session, peer: str) -> None:
    """Refuse (one sentence) to let a session arriving from ``peer`` take the place of ``session`` here, unless that
    one came from the same peer or went to it."""
    if not session.exists():
        return
    state = session.load_state()
    if peer not in (state.arrived_from, state.moved_to):
        raise UsageError(f"{installation_name()} has a session named {session.name!r} of its own, which a session "
                         f"from {peer} cannot replace; rename one of them.")
