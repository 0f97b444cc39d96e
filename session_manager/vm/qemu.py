"""Finding QEMU, checking it is new enough, choosing an accelerator, building the command line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Protocol

from ..errors import QemuError
from ..files import atomic_write
from .machine import DISK_DEVICE, Sockets, node_name

log = logging.getLogger(__name__)

MIN_VERSION = (7, 2)
QEMU_ENV = "SESSION_MANAGER_QEMU"  # path of qemu-system-x86_64, for unusual installs


@dataclass(frozen=True)
class Qemu:
    system: str
    img: str
    version: tuple[int, int, int]
    # A QEMU unpacked into a private prefix (e.g. `dpkg-deb -x` of a newer Debian package) must be told where its
    # own firmware and modules are, or it loads the system QEMU's ("Only modules from the same build ...").
    data_dir: str | None = None
    module_dir: str | None = None

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def command(self) -> list[str]:
        """How to run qemu-system-x86_64: the binary, with its prefix's firmware and modules when it has its own."""
        argv = [self.system]
        if self.module_dir:
            argv = ["env", f"QEMU_MODULE_DIR={self.module_dir}", *argv]
        if self.data_dir:
            argv += ["-L", self.data_dir]
        return argv

    def describe(self) -> str:
        return f"QEMU {self.version_text} ({self.system})"


def qemu_path(setting: str | None = None) -> str | None:
    """The qemu-system-x86_64 to use: $SESSION_MANAGER_QEMU, else the ``qemu`` setting, else None (the one on PATH)."""
    return os.environ.get(QEMU_ENV) or setting or None


@cache
def find_qemu(path: str | None = None) -> Qemu:
    """The QEMU at ``path`` (see :func:`qemu_path`), or qemu-system-x86_64 on PATH; checked to be new enough."""
    if path and not os.access(path, os.X_OK):
        raise QemuError(f"{path} is not an executable QEMU; fix {QEMU_ENV} or the qemu setting in settings.toml, or "
                        "remove it to use the system's QEMU.")
    system = path or shutil.which("qemu-system-x86_64")
    img = (shutil.which("qemu-img", path=os.path.dirname(system) + os.pathsep + os.environ.get("PATH", ""))
           if system else None)
    if not system or not img:
        raise QemuError(
            "QEMU is not installed; install it with `sudo apt-get install qemu-system-x86 qemu-utils` and try again."
        )
    prefix = Path(system).resolve().parent.parent
    data_dir = module_dir = None
    if prefix != Path("/usr"):
        data_dir = str(prefix / "share/qemu") if (prefix / "share/qemu").is_dir() else None
        module_dir = next((str(d) for d in (prefix / "lib/x86_64-linux-gnu/qemu", prefix / "lib/qemu") if d.is_dir()),
                          None)
    env = {**os.environ, "QEMU_MODULE_DIR": module_dir} if module_dir else None
    out = subprocess.run([system, "--version"], capture_output=True, text=True, env=env).stdout
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if not m:
        raise QemuError(f"{system} did not report a version; reinstall QEMU (qemu-system-x86) and try again.")
    version = (int(m[1]), int(m[2]), int(m[3]))
    if version[:2] < MIN_VERSION:
        raise QemuError(
            f"QEMU {'.'.join(m.groups())} is too old: session-manager needs QEMU 7.2 or newer for "
            "background snapshots; upgrade qemu-system-x86."
        )
    return Qemu(system, img, version, data_dir, module_dir)


@cache
def _machine_help(qemu: Qemu) -> str:
    return subprocess.run([*qemu.command, "-machine", "help"], capture_output=True, text=True).stdout


def machine_type(qemu: Qemu, alias: str = "q35") -> str:
    """Resolve an alias such as ``q35`` to the versioned type (``pc-q35-7.2``).

    A session records the versioned name, so its checkpoints stay loadable
    after QEMU is upgraded.
    """
    m = re.search(rf"^{re.escape(alias)}\s.*\(alias of ([\w.-]+)\)", _machine_help(qemu), re.M)
    return m[1] if m else alias


def machine_types(qemu: Qemu) -> set[str]:
    return set(re.findall(r"^([\w.-]+)\s", _machine_help(qemu), re.M)) - {"Supported"}


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a version such as "10.0.2": QEMU keeps the migration format within a release series."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise ValueError(version)
    return int(m[1]), int(m[2])


def cannot_load(have: str, machines: set[str] | None, written_by: str | None, machine: str) -> str | None:
    """Why QEMU ``have`` (knowing ``machines``, when known) cannot load a machine state that QEMU ``written_by``
    saved for machine type ``machine``, or None when it can.

    QEMU loads the state of an older or the same release into the same machine type (that is what versioned
    machine types are for), but not of a newer one: its devices may carry state the older one does not know."""
    newer = written_by is not None and release(written_by) > release(have)
    if not newer and (machines is None or machine in machines):
        return None
    needed = ".".join(map(str, release(written_by))) if newer and written_by else None
    return (f"its state comes from QEMU {written_by} with machine type {machine}, which QEMU {have} cannot load; "
            + (f"it needs QEMU {needed} or newer" if needed else f"it needs a QEMU that has machine type {machine}"))


# -- accelerator --------------------------------------------------------------

@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    reason: str


def choose_accelerator(cache_dir: Path, qemu: Qemu) -> Accel:
    """KVM when a tiny guest of our own boots under it at native speed, TCG otherwise.

    /dev/kvm can exist and still crawl (nested virtualisation: on the machines this was built on, a Linux
    guest seems to hang, and the firmware alone takes 2.9 s to boot, where TCG boots it in 0.1 s), so the
    firmware and a boot sector that prints a mark on its serial line must finish within PROBE_SECONDS.
    Nothing is downloaded.  The answer is kept in ``cache_dir`` (per user, not per home) until the host
    reboots or the QEMU changes.
    """
    key = {"boot_id": boot_id(), "qemu": qemu.system, "version": qemu.version_text}
    cache_file = cache_dir / "accelerator.json"
    try:
        cached = json.loads(cache_file.read_text())
        if cached["key"] == key:
            return Accel(cached["name"], cached["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        accel = Accel("tcg", "/dev/kvm is missing or not accessible to this user")
    else:
        accel = probe(qemu, "kvm")
    with contextlib.suppress(OSError):  # an unwritable cache only costs the next start another probe
        atomic_write(cache_file, json.dumps({"key": key, "name": accel.name, "reason": accel.reason}).encode())
    return accel


PROBE_SECONDS = 1.5
PROBE_MARK = b"sm-kvm-ok"


def probe_image() -> bytes:
    """A 1 MiB raw disk whose boot sector (16-bit real mode) writes PROBE_MARK and a newline to COM1 and halts."""
    code = bytes.fromhex(
        "baf803"                              # mov dx, 0x3f8 (COM1)
        "be137c"                              # mov si, 0x7c13 (the mark, below)
        "fc" "ac" "84c0" "7403" "ee" "ebf8"   # cld; next: lodsb; test al, al; jz done; out dx, al; jmp next
        "fa" "f4" "ebfd"                      # done: cli; hlt; jmp back to the hlt
    )
    assert len(code) == 0x13
    return (code + PROBE_MARK + b"\n\0").ljust(510, b"\0") + b"\x55\xaa" + bytes((1 << 20) - 512)


def probe(qemu: Qemu, accel: str) -> Accel:
    """``accel`` if the probe guest runs under it in time, else TCG with the reason."""
    with tempfile.TemporaryDirectory(prefix="sm-kvm-probe-") as tmp:
        serial, disk, errors = Path(tmp) / "serial.log", Path(tmp) / "probe.img", Path(tmp) / "stderr"
        disk.write_bytes(probe_image())
        argv = [
            *qemu.command, "-accel", accel, "-machine", "q35", "-m", "16", "-nodefaults", "-display", "none",
            "-no-reboot", "-serial", f"file:{serial}", "-drive", f"file={disk},format=raw,if=virtio,snapshot=on",
        ]
        start = time.monotonic()
        with open(errors, "wb") as err:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        try:
            while time.monotonic() - start < PROBE_SECONDS:
                if proc.poll() is not None:
                    break
                if serial.exists() and PROBE_MARK in serial.read_bytes():
                    return Accel(accel,
                                 f"a probe guest booted under {accel.upper()} in {time.monotonic() - start:.2f} s")
                time.sleep(0.01)
            else:
                return Accel("tcg", f"a probe guest did not boot under {accel.upper()} within {PROBE_SECONDS} s, so "
                                    f"it is too slow here to run a desktop (nested virtualisation?)")
            lines = errors.read_text(errors="replace").strip().splitlines()
            return Accel("tcg", f"QEMU could not use {accel.upper()}: "
                                f"{lines[-1] if lines else 'exit ' + str(proc.returncode)}")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


# QEMU logs why it shuts down (a trace event, on stderr: the session's qemu.log), so that a guest switching itself
# off is told apart from a crash; the reason numbers are QEMU's ShutdownCause (qapi/run-state.json).
SHUTDOWN_TRACE = "qemu_system_shutdown_request reason="
GUEST_SHUTDOWN = 6


class MachineSpec(Protocol):
    """What the command line is made of: a session's config (local/sessions.py) is one."""

    @property
    def name(self) -> str: ...
    @property
    def machine(self) -> str: ...
    @property
    def memory_mib(self) -> int: ...
    @property
    def cpus(self) -> int: ...
    @property
    def boot(self) -> str: ...
    @property
    def kernel(self) -> str | None: ...
    @property
    def initrd(self) -> str | None: ...
    @property
    def append(self) -> str | None: ...
    @property
    def iso(self) -> str | None: ...
    @property
    def vnc_tcp(self) -> str | None: ...
    @property
    def desktop(self) -> bool: ...
    @property
    def account(self) -> str | None: ...


def command_line(
    qemu: Qemu,
    config: MachineSpec,
    *,
    accel: str,
    top_layer: Path,
    sockets: Sockets,
    serial_log: Path,
    incoming: bool = False,
    paused: bool = False,
) -> list[str]:
    """The QEMU command line of a session.  Restores use the same one, plus ``-incoming defer``.

    ``paused`` (``-S``): the guest does not start by itself, not even when an incoming migration completes;
    a live migration's destination waits so until the source has confirmed the switch (vm/migrate.py)."""
    disk = {
        "driver": "qcow2",
        "node-name": node_name(top_layer.name),
        "file": {"driver": "file", "filename": str(top_layer)},
    }
    argv = [
        *qemu.command,
        "-name", f"{config.name},process=session-manager:{config.name}",
        "-machine", f"{config.machine},accel={accel}",
        "-m", f"{config.memory_mib}M",
        "-smp", str(config.cpus),
        "-nodefaults",
        "-vga", "std",
        "-display", "none",
        # Every display has a sound backend, even without a sound card: without one QEMU 7.2 still offers VNC's
        # audio extension and, once the viewer enables it, probes the host's sound systems for a backend of its own.
        # "none" only clocks the card (if any); its sound reaches the viewer over VNC (verified on 7.2 and 10.0).
        "-audiodev", f"none,id={AUDIODEV}",
        "-vnc", f"unix:{sockets.vnc},audiodev={AUDIODEV}",
        "-chardev", f"socket,id=qmp,path={sockets.qmp},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-pidfile", str(sockets.pidfile),
        "-trace", f"enable={SHUTDOWN_TRACE.split()[0]}",
        "-chardev", f"file,id=serial0,path={serial_log},append=on",
        "-serial", "chardev:serial0",
        "-blockdev", json.dumps(disk),
        "-device", f"virtio-blk-pci,drive={disk['node-name']},id={DISK_DEVICE},bootindex=1",
        "-device", "qemu-xhci,id=usb",
        "-device", "usb-tablet,bus=usb.0",
        "-netdev", "user,id=net0",
        "-device", "virtio-net-pci,netdev=net0",
    ]
    if config.desktop:
        argv += desktop_devices(sockets)
    if config.account:
        argv += ["-fw_cfg", f"name={ACCOUNT_FW_CFG},file={sockets.account}"]
    if config.vnc_tcp:
        argv += ["-vnc", f"{config.vnc_tcp},id=tcp,audiodev={AUDIODEV}"]
    if config.boot == "kernel":
        argv += ["-kernel", str(config.kernel)]
        if config.initrd:
            argv += ["-initrd", str(config.initrd)]
        if config.append:
            argv += ["-append", config.append]
    if config.iso:
        argv += [
            "-drive", f"if=none,id=cd0,media=cdrom,readonly=on,file={config.iso}",
            "-device", "ide-cd,drive=cd0,bootindex=2",
        ]
    if incoming:
        argv += ["-incoming", "defer"]
    if paused:
        argv += ["-S"]
    return argv


AUDIODEV = "snd0"
# The account a desktop image creates at its first boot (guests/desktop.py reads it): "NAME HASH", HASH as crypt(3)
# writes it ($6$...) or "!" for none.
ACCOUNT_FW_CFG = "opt/org.session-manager/account"
ACCOUNT = re.compile(r"[a-z_][a-z0-9_-]{0,31} (?:[!*]|\$[0-9a-z]+\$[./0-9A-Za-z$=,-]+)")


def account_line(name: str, password_hash: str) -> str:
    """The account line for ACCOUNT_FW_CFG; ValueError (a sentence) if the name cannot be an account's."""
    line = f"{name} {password_hash}"
    if not ACCOUNT.fullmatch(line):
        raise ValueError("an account name is lower-case letters, digits, _ and -, starting with a letter or _, at "
                         "most 32 characters.")
    return line


def write_account(config: MachineSpec, sockets: Sockets) -> None:
    """The file the command line's fw_cfg entry names, if the config has an account: a file, not a string in argv,
    which every local user can read."""
    if config.account:
        atomic_write(sockets.account, f"{config.account}\n".encode())


def desktop_devices(sockets: Sockets) -> list[str]:
    """A desktop's sound card and agent channels.  Every one migrates, so checkpoints keep working: the sound goes
    out through VNC's audio extension (the display's "none" backend only clocks it), and the agents' virtio-serial ports
    are plain sockets, not QEMU's own vdagent chardev, which blocks migration (7.2 to 10.0 at least)."""
    return [
        "-global", "VGA.vgamem_mb=64",  # room for a screen as large as the window, up to 3840x2160
        "-device", "intel-hda,id=sound0",
        "-device", f"hda-output,audiodev={AUDIODEV}",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=qga0,path={sockets.guest_agent},server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        "-chardev", f"socket,id=vdagent0,path={sockets.vdagent},server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=vdagent0,name=com.redhat.spice.0",
    ]
