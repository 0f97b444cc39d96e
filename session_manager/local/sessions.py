"""Sessions on disk: the user's choices (config.toml) and what the engine keeps (state.json).

A session directory holds::

    config.toml     machine, memory, CPUs, boot source, base disk (user-edited choices)
    state.json      the active overlay, the checkpoint the running state descends
                    from ("head"), after a saving stop the checkpoint to resume, and
                    while QEMU should be running the host boot it was started in
    disks/          qcow2 overlays: one per checkpoint (frozen, never written
                    again) and the active one QEMU writes to

The user's own disk image is only ever a read-only backing file.
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import tomli_w

from ..errors import DamagedError, NotFoundError, UsageError
from ..files import atomic_write
from ..paths import Home, check_name, valid_name
from ..vm.qemu import ACCOUNT

BootKind = Literal["kernel", "disk", "iso"]


@dataclass
class SessionConfig:
    name: str
    machine: str
    memory_mib: int
    cpus: int
    boot: BootKind
    disk_size: int
    base_image: str | None = None  # the user's image (read-only backing file)
    base_format: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    iso: str | None = None
    vnc_tcp: str | None = None  # e.g. "127.0.0.1:1"; unix socket only when unset
    # A desktop's devices: a sound card and the channels of the guest's agents (qemu-guest-agent, spice-vdagent).
    # Fixed at creation, as every device is: a checkpoint loads only into the devices it was taken with.
    desktop: bool = False
    # A desktop image's account, created at its first boot: "NAME HASH" (vm/qemu.py account_line).
    account: str | None = None
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_toml(self) -> str:
        return tomli_w.dumps({k: v for k, v in asdict(self).items() if v is not None})

    @classmethod
    def from_json(cls, fields: object) -> SessionConfig:
        """From a JSON object that came from elsewhere (a checkpoint's meta, a peer), every field of its type, so no
        option can ride in a QEMU argument; ValueError if not."""
        try:
            if not isinstance(fields, dict) or set(fields) - set(_TYPES) or any(
                    not isinstance(v, _TYPES[k]) or isinstance(v, bool) != (_TYPES[k] is bool)
                    for k, v in fields.items()):
                raise TypeError(fields)
            config = cls(**fields)
            check_name(config.name)
            if not _MACHINE.fullmatch(config.machine) or config.boot not in ("kernel", "disk", "iso") \
                    or config.disk_size <= 0 or (config.account is not None and not ACCOUNT.fullmatch(config.account)):
                raise ValueError(config)
        except (TypeError, ValueError, UsageError):
            raise ValueError("malformed session config") from None
        return config


_TYPES: dict[str, type | tuple[type, ...]] = {
          "name": str, "machine": str, "memory_mib": int, "cpus": int, "boot": str, "disk_size": int,
          "base_image": (str, type(None)), "base_format": (str, type(None)), "kernel": (str, type(None)),
          "initrd": (str, type(None)), "append": (str, type(None)), "iso": (str, type(None)),
          "vnc_tcp": (str, type(None)), "desktop": bool, "account": (str, type(None)),
          "created": str}
_MACHINE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class SessionState:
    active_layer: str
    head: str | None = None
    saved: str | None = None
    # The host's boot id while QEMU should be running: set when it is launched, cleared when it is stopped on
    # purpose.  Set with no QEMU alive means QEMU died, or the host did (then the boot id differs).
    running_boot: str | None = None
    # Disk files that hold, with their backing chain, exactly a checkpoint's disk: file name -> checkpoint id.
    # A local copy for fast restores and incremental disk saves; the repository has every disk too.
    layers: dict[str, str] = field(default_factory=dict)
    # The paired peer the session was live-migrated to, which runs it now; this computer runs it no more.
    moved_to: str | None = None
    # The paired peer the session came from (live migration or `send`): only that peer may see its screen or
    # replace it with another arrival (net/arrivals.py).
    arrived_from: str | None = None


class Session:
    """One session's files.  Nothing here talks to QEMU."""

    def __init__(self, home: Home, name: str) -> None:
        self.home = home
        self.name = check_name(name)
        self.dir = home.session_data(name)
        self.state_dir = home.session_state(name)

    # -- files -------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.dir / "config.toml"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def disks(self) -> Path:
        return self.dir / "disks"

    @property
    def serial_log(self) -> Path:
        return self.state_dir / "serial.log"

    @property
    def qemu_log(self) -> Path:
        return self.state_dir / "qemu.log"

    @property
    def runtime(self) -> Path:
        return self.home.session_runtime(self.name)

    def exists(self) -> bool:
        return self.config_file.is_file()

    def require(self) -> Session:
        if not self.exists():
            raise NotFoundError(
                f"There is no session named {self.name!r}; `session-manager list` shows the sessions you have."
            )
        return self

    # -- config and state ----------------------------------------------------
    def load_config(self) -> SessionConfig:
        path = self.require().config_file
        try:
            with open(path, "rb") as f:
                return SessionConfig(**tomllib.load(f))
        except (OSError, ValueError, TypeError) as e:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
            raise self._damaged(path, e) from None

    def load_state(self) -> SessionState:
        try:
            fields = json.loads(self.state_file.read_text())
            if not isinstance(fields, dict):
                raise TypeError("not a JSON object")
            return SessionState(**fields)
        except (OSError, ValueError, TypeError) as e:
            raise self._damaged(self.state_file, e) from None

    def _damaged(self, path: Path, e: Exception) -> DamagedError:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:120]
        return DamagedError(f"Session {self.name!r} cannot be read: {path} is damaged ({why}); repair or remove that "
                            "file (its checkpoints are safe in the repository); the other sessions are not affected.")

    def save_state(self, state: SessionState) -> None:
        atomic_write(self.state_file, json.dumps(asdict(state), indent=2).encode())

    def layer_path(self, layer: str) -> Path:
        return self.disks / layer

    # -- lifecycle -------------------------------------------------------------
    def create(self, config: SessionConfig, first_layer: str) -> None:
        if self.exists():
            raise UsageError(
                f"A session named {self.name!r} already exists; choose another name or delete it first."
            )
        self.disks.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.save_state(SessionState(active_layer=first_layer))
        atomic_write(self.config_file, config.to_toml().encode())

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        shutil.rmtree(self.home.runtime / self.name, ignore_errors=True)


def list_sessions(home: Home) -> list[Session]:
    if not home.sessions.is_dir():
        return []
    return [Session(home, p.name) for p in sorted(home.sessions.iterdir())
            if valid_name(p.name) and (p / "config.toml").is_file()]

