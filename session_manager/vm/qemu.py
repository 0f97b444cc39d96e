"""Finding QEMU, checking it is new enough, choosing an accelerator, building the command line."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..errors import QemuError, SessionManagerError
from ..sessions import SessionConfig
from .machine import DISK_DEVICE, Sockets, node_name

log = logging.getLogger(__name__)

MIN_VERSION = (7, 2)
QEMU_ENV = "SESSION_MANAGER_QEMU"  # path of qemu-system-x86_64, for unusual installs
PROBE_SECONDS = 20.0


@dataclass(frozen=True)
class Qemu:
    system: str
    img: str
    version: tuple[int, int, int]

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))


@cache
def find_qemu() -> Qemu:
    forced = os.environ.get(QEMU_ENV)
    if forced and not os.access(forced, os.X_OK):
        raise QemuError(f"{QEMU_ENV} names {forced}, which is not an executable; fix or unset it.")
    system = forced or shutil.which("qemu-system-x86_64")
    img = shutil.which("qemu-img", path=os.path.dirname(system) + os.pathsep + os.environ.get("PATH", "")) if system else None
    if not system or not img:
        raise QemuError(
            "QEMU is not installed; install it with `sudo apt-get install qemu-system-x86 qemu-utils` and try again."
        )
    out = subprocess.run([system, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if not m:
        raise QemuError(f"{system} did not report a version; reinstall QEMU (qemu-system-x86) and try again.")
    version = (int(m[1]), int(m[2]), int(m[3]))
    if version[:2] < MIN_VERSION:
        raise QemuError(
            f"QEMU {'.'.join(m.groups())} is too old: session-manager needs QEMU 7.2 or newer for "
            "background snapshots; upgrade qemu-system-x86."
        )
    return Qemu(system, img, version)


def machine_type(qemu: Qemu, alias: str = "q35") -> str:
    """Resolve an alias such as ``q35`` to the versioned type (``pc-q35-7.2``).

    A session records the versioned name, so its checkpoints stay loadable
    after QEMU is upgraded.
    """
    out = subprocess.run([qemu.system, "-machine", "help"], capture_output=True, text=True).stdout
    m = re.search(rf"^{re.escape(alias)}\s.*\(alias of ([\w.-]+)\)", out, re.M)
    return m[1] if m else alias


# -- accelerator --------------------------------------------------------------

@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    reason: str


def choose_accelerator(cache_dir: Path, guest: Callable[[], tuple[Path, Path]]) -> Accel:
    """KVM when a real guest boots under it within PROBE_SECONDS, TCG otherwise.

    /dev/kvm can exist and still hang guests (nested virtualisation), so the
    only trustworthy check is booting the test guest (``guest()`` builds it)
    and waiting for it to say ``ready``.  The answer is kept until the host
    reboots or QEMU changes.
    """
    qemu = find_qemu()
    key = {"boot_id": boot_id(), "qemu": qemu.version_text}
    cache_file = cache_dir / "accelerator.json"
    try:
        cached = json.loads(cache_file.read_text())
        if cached["key"] == key:
            return Accel(cached["name"], cached["reason"])
    except (OSError, ValueError, KeyError):
        pass
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        accel = Accel("tcg", "/dev/kvm is missing or not accessible to this user")
    else:
        try:
            accel = _probe_kvm(qemu, *guest())
        except SessionManagerError as e:
            return Accel("tcg", f"KVM could not be probed ({e})")  # not cached: try again next time
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps({"key": key, "name": accel.name, "reason": accel.reason}))
    return accel


def _probe_kvm(qemu: Qemu, kernel: Path, initrd: Path) -> Accel:
    with tempfile.TemporaryDirectory(prefix="sm-kvm-probe-") as tmp:
        serial = Path(tmp) / "serial.log"
        argv = [
            qemu.system, "-accel", "kvm", "-machine", "q35", "-m", "128", "-nodefaults",
            "-display", "none", "-no-reboot", "-serial", f"file:{serial}",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1",
        ]
        start = time.monotonic()
        errors = Path(tmp) / "stderr"
        with open(errors, "wb") as err:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        try:
            while time.monotonic() - start < PROBE_SECONDS:
                if proc.poll() is not None:
                    break
                if serial.exists() and b"ready" in serial.read_bytes():
                    return Accel("kvm", f"a test guest booted under KVM in {time.monotonic() - start:.1f} s")
                time.sleep(0.1)
            else:
                return Accel("tcg", f"a test guest did not boot under KVM within {PROBE_SECONDS:.0f} s")
            lines = errors.read_text(errors="replace").strip().splitlines()
            return Accel("tcg", f"QEMU could not use KVM: {lines[-1] if lines else 'exit ' + str(proc.returncode)}")
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


def command_line(
    qemu: Qemu,
    config: SessionConfig,
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
        qemu.system,
        "-name", f"{config.name},process=session-manager:{config.name}",
        "-machine", f"{config.machine},accel={accel}",
        "-m", f"{config.memory_mib}M",
        "-smp", str(config.cpus),
        "-nodefaults",
        "-vga", "std",
        "-display", "none",
        "-vnc", f"unix:{sockets.vnc}",
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
    if config.vnc_tcp:
        argv += ["-vnc", f"{config.vnc_tcp},id=tcp"]
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
