"""Build a Debian desktop base image from Debian's packages: Xfce, a terminal, an editor, a browser and the agents.

    python3 -m session_manager.guests.desktop OUTDIR

``mmdebstrap`` builds the root file system (as root, or as an ordinary user in its unshare mode) and ``mke2fs -d``
turns it into an ext4 image, with no mount; ``qemu-img`` makes that the qcow2 base every desktop session is an
overlay of.  OUTDIR then holds::

    vmlinuz, initrd.img   the image's own kernel, which QEMU boots directly (the guest holds its kernel package, so
                          an upgrade inside never removes the modules of the kernel that boots it)
    base.qcow2            the root file system: never written again, the read-only backing of every session
    recipe.json           what it was built from; a build with another recipe goes to another OUTDIR

Xfce rather than LXQt: both are light, but Xfce's session, panel and window manager come as a handful of Debian
packages that start from one ``startxfce4``, and its terminal, editor and settings are one toolkit (GTK, like
Firefox), which keeps the image small and the look consistent.

The account is not in the image, so one base serves every person: at the first boot ``sm-firstboot`` reads the name
and password hash that QEMU hands over (fw_cfg ``opt/org.session-manager/account``, see vm/qemu.py ``account_line``),
creates the account and logs it in automatically from then on.  When the desktop is up the guest writes
``desktop ready`` on its serial line (COM1, the session's serial.log), which tests and the first start wait for.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import SessionManagerError

SUITE = "bookworm"
READY_LINE = "desktop ready"
KERNEL_APPEND = "root=/dev/vda rw console=ttyS0 quiet"
IMAGE_SIZE = 32 << 30  # the root file system's size; sparse, so only what is used costs disk

PACKAGES = [
    "linux-image-amd64", "systemd-sysv", "udev", "dbus", "sudo", "procps", "less", "ca-certificates",
    "xserver-xorg-core", "xserver-xorg-input-libinput", "xinit", "x11-xserver-utils", "dbus-x11",
    "xfce4-session", "xfwm4", "xfce4-panel", "xfdesktop4", "xfce4-settings", "xfce4-terminal", "mousepad", "thunar",
    "fonts-dejavu-core", "adwaita-icon-theme",
    # the agents: clipboard and screen size (spice-vdagent), files in and the clock (qemu-guest-agent)
    "spice-vdagent", "qemu-guest-agent",
    # sound (the account's PulseAudio needs its login session: libpam-systemd; ALSA programs reach it through
    # libasound2-plugins), a browser, and what tests and benchmarks drive the desktop with
    "libpam-systemd", "alsa-utils", "pulseaudio", "libasound2-plugins", "xfce4-pulseaudio-plugin", "firefox-esr",
    "xdotool", "xclip",
]

# Files written into the image: path -> (mode, text).
GUEST_FILES: dict[str, tuple[int, str]] = {
    "/etc/fstab": (0o644, "/dev/vda / ext4 defaults 0 1\n"),
    "/etc/hostname": (0o644, "desktop\n"),
    "/etc/hosts": (0o644, "127.0.0.1 localhost\n127.0.1.1 desktop\n"),
    # QEMU's user network: DHCP from systemd-networkd, and its DNS forwarder.
    "/etc/systemd/network/80-dhcp.network": (0o644, "[Match]\nName=en*\n\n[Network]\nDHCP=yes\n"),
    "/etc/resolv.conf": (0o644, "nameserver 10.0.2.3\n"),
    "/usr/local/sbin/sm-firstboot": (0o755, r"""#!/bin/sh
# Create the account QEMU hands over (fw_cfg), once; it is then logged in automatically.
set -eu
modprobe qemu_fw_cfg 2>/dev/null || true
f=/sys/firmware/qemu_fw_cfg/by_name/opt/org.session-manager/account/raw
name=user hash='!'
if [ -r "$f" ]; then read -r name hash < "$f" || true; fi
case "$name" in ''|*[!a-z0-9_-]*|[!a-z_]*) echo "sm-firstboot: bad account name" >&2; name=user hash='!';; esac
id "$name" >/dev/null 2>&1 || useradd -m -s /bin/bash -G sudo,audio,video "$name"
usermod -p "$hash" "$name"
install -d -o "$name" -g "$name" "/home/$name/Downloads" "/home/$name/Desktop"
mkdir -p /etc/session-manager
echo "$name" > /etc/session-manager/user
"""),
    "/usr/local/sbin/sm-desktop": (0o755, """#!/bin/sh
# X and Xfce for the session's account (a unit, not a display manager: nothing to log in to).
user=$(cat /etc/session-manager/user)
exec xinit /bin/su - "$user" -c "DISPLAY=:0 exec dbus-launch --exit-with-session startxfce4" \\
    -- /usr/bin/Xorg :0 vt7 -nolisten tcp -keeptty
"""),
    "/etc/systemd/system/sm-firstboot.service": (0o644, """[Unit]
Description=Create the session's account (session-manager)
ConditionPathExists=!/etc/session-manager/user
Before=sm-desktop.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/sm-firstboot
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
"""),
    "/etc/systemd/system/sm-desktop.service": (0o644, """[Unit]
Description=The desktop, logged in automatically (session-manager)
After=systemd-user-sessions.service sm-firstboot.service
Wants=sm-firstboot.service

[Service]
ExecStart=/usr/local/sbin/sm-desktop
Restart=always
RestartSec=2

[Install]
WantedBy=graphical.target
"""),
    "/usr/local/sbin/sm-ready": (0o755, """#!/bin/sh
# "desktop ready" on the serial line once the panel is on the screen (Xfce's last part to appear).
user=$(cat /etc/session-manager/user)
until su - "$user" -c 'DISPLAY=:0 xdotool search --onlyvisible --classname xfce4-panel' >/dev/null 2>&1; do
    sleep 1
done
echo "desktop ready" > /dev/ttyS0
"""),
    "/etc/systemd/system/sm-ready.service": (0o644, """[Unit]
Description=Say on the serial line when the desktop is up (session-manager)
After=sm-desktop.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/sm-ready

[Install]
WantedBy=graphical.target
"""),
    # spice-vdagentd would wait for a logind seat session; the desktop is started by a unit, not a display manager.
    "/etc/default/spice-vdagentd": (0o644, 'SPICE_VDAGENTD_EXTRA_ARGS="-X"\n'),
}

SETUP_COMMANDS = [
    "systemctl enable systemd-networkd sm-firstboot sm-desktop sm-ready",
    "systemctl set-default graphical.target",
    # The kernel QEMU boots is the one this image was built with; keep apt from removing its modules.
    "apt-mark hold linux-image-amd64 $(dpkg-query -W -f '${Package}\\n' 'linux-image-[0-9]*')",
    "apt-get clean",
]


SUBID_FILES = ("/etc/subuid", "/etc/subgid")  # the ranges of ids mmdebstrap's unshare mode maps


class BuildError(SessionManagerError):
    pass


def recipe() -> dict[str, object]:
    return {"suite": SUITE, "packages": PACKAGES,
            "files": {path: [mode, text] for path, (mode, text) in GUEST_FILES.items()},
            "setup": SETUP_COMMANDS, "size": IMAGE_SIZE}


def recipe_id() -> str:
    """Names the build: the same recipe is built once and shared."""
    digest = hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()[:12]
    return f"{SUITE}-xfce-{digest}"


def missing_tools() -> str | None:
    """What stops this user from building, as one sentence, or None."""
    for tool, package in (("mmdebstrap", "mmdebstrap"), ("mke2fs", "e2fsprogs"), ("qemu-img", "qemu-utils")):
        if not shutil.which(tool):
            return f"Building a desktop needs {tool}; install it with `sudo apt-get install {package}`."
    if os.geteuid() == 0:
        return None
    if not shutil.which("newuidmap"):
        return "Building a desktop as an ordinary user needs newuidmap; install it with `sudo apt-get install uidmap`."
    user = _user_name()
    for file in SUBID_FILES:
        try:
            listed = any(line.split(":")[0] == user for line in Path(file).read_text().splitlines())
        except OSError:
            listed = False
        if not listed:
            return (f"Building a desktop as an ordinary user needs a range of ids for {user} in {file}; ask an "
                    f"administrator to run `sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 "
                    f"{user}`.")
    if Path("/proc/sys/kernel/unprivileged_userns_clone").exists() and \
            Path("/proc/sys/kernel/unprivileged_userns_clone").read_text().strip() == "0":
        return ("Building a desktop as an ordinary user needs user namespaces, which this system disables; ask an "
                "administrator to run `sudo sysctl kernel.unprivileged_userns_clone=1`.")
    return None


def _user_name() -> str:
    import pwd
    return pwd.getpwuid(os.geteuid()).pw_name


def built(outdir: Path) -> bool:
    return all((outdir / name).is_file() for name in ("vmlinuz", "initrd.img", "base.qcow2", "recipe.json"))


# mmdebstrap's phases, as it announces them on stderr, and how far along the build is then.
PHASES = [("downloading packages", 5, "downloading Debian's packages"),
          ("extracting archives", 30, "unpacking"),
          ("installing essential packages", 40, "installing the base system"),
          ("installing remaining packages", 55, "installing the desktop"),
          ("running --customize-hook", 85, "writing the disk image")]


def build(outdir: Path, *, progress: Callable[[int, str], None] | None = None) -> Path:
    """Build into ``outdir`` (once: a complete build there is reused) and return it."""
    if built(outdir):
        return outdir
    why = missing_tools()
    if why:
        raise BuildError(why)
    outdir.parent.mkdir(parents=True, exist_ok=True)
    with open(outdir.with_name(outdir.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; who waited finds it built
        if not built(outdir):
            _build(outdir, progress or (lambda percent, text: None))
    return outdir


def write_guest_files(files: Path) -> None:
    """GUEST_FILES as a tree under ``files``, to be copied over the root file system with their modes: every
    folder 0755 whatever the umask (the CLI's is 077), or /etc and /usr in the image would become root's alone."""
    for path, (mode, text) in GUEST_FILES.items():
        target = files / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
    for folder in (files, *files.rglob("*")):
        if folder.is_dir():
            folder.chmod(0o755)


def _build(outdir: Path, report: Callable[[int, str], None]) -> None:
    work = outdir.with_name(outdir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    # In unshare mode the hooks run as the namespace's root, which is one of this user's subordinate ids: it may
    # write the results here only if everyone may (the folder above is this user's own).
    unshare = os.geteuid() != 0
    work.mkdir(mode=0o755)
    if unshare:
        work.chmod(0o777)
    files = work / "files"
    write_guest_files(files)
    raw = work / "root.img"
    out, stage = shlex.quote(str(work)), '"$1"/sm-stage'
    hooks = [
        f'cp -R --preserve=mode {shlex.quote(str(files))}/. "$1"/',
        *(f'chroot "$1" sh -c "{cmd}"' for cmd in (c.replace('"', '\\"').replace("$", "\\$") for c in SETUP_COMMANDS)),
        f'cp -L "$1"/vmlinuz {out}/vmlinuz && cp -L "$1"/initrd.img {out}/initrd.img',
        # mke2fs -d copies a directory; /proc, /sys and /dev are mounted in the chroot now, so copy the one file
        # system aside first (inside mmdebstrap's own temporary folder, which it removes even after a failure),
        # with an empty /dev (the kernel mounts its own; in unshare mode these are bind mounts no one may mknod) ...
        f'mkdir {stage} && tar -C "$1" --one-file-system --exclude=./sm-stage --exclude="./dev/*" -cf - . '
        f'| tar -C {stage} -xpf -',
        # ... and undo there what mmdebstrap undoes only after the hooks: its service blockers and apt settings.
        f'cd {stage} && rm -f usr/sbin/policy-rc.d etc/apt/apt.conf.d/00mmdebstrap etc/apt/apt.conf.d/99mmdebstrap '
        'etc/dpkg/dpkg.cfg.d/99mmdebstrap && mv sbin/start-stop-daemon.REAL sbin/start-stop-daemon '
        '&& : > etc/machine-id && rm -rf var/lib/apt/lists/* var/cache/apt/*.bin',
        f'mke2fs -q -t ext4 -L root -d {stage} {shlex.quote(str(raw))} {IMAGE_SIZE // (1 << 20)}M && rm -rf {stage}',
    ]
    argv = ["mmdebstrap", "--variant=apt", "--mode=" + ("unshare" if unshare else "root"),
            "--include=" + ",".join(PACKAGES),
            *(f"--customize-hook={h}" for h in hooks), SUITE, "/dev/null"]
    report(0, "starting")
    lines: list[str] = []
    # The image's own files get Debian's modes, not the CLI's umask (077).
    proc = subprocess.Popen(["sh", "-c", 'umask 022 && exec "$@"', "sh", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(work)} if unshare else None)
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line.rstrip())
        for mark, percent, text in PHASES:
            if mark in line:
                report(percent, text)
    if proc.wait() != 0:
        first = next((ln for ln in lines if ln.startswith("E:")), lines[-1] if lines else "no output")
        raise BuildError(f"Building the desktop image failed ({first[:200]}); check the network and the disk space, "
                         f"then try again.")
    if unshare:  # the kernel and initrd were written by the namespace's root: make them this user's
        for name in ("vmlinuz", "initrd.img"):
            shutil.copyfile(work / name, work / f"{name}.own")
            os.replace(work / f"{name}.own", work / name)
    report(90, "writing the base image")
    qemu_img = shutil.which("qemu-img") or "qemu-img"
    done = subprocess.run([qemu_img, "convert", "-O", "qcow2", str(raw), str(work / "base.qcow2")],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"qemu-img could not write the base image: {done.stderr.strip()[:200]}.")
    raw.unlink()
    shutil.rmtree(files)
    (work / "base.qcow2").chmod(0o444)
    work.chmod(0o755)
    (work / "recipe.json").write_text(json.dumps(recipe(), indent=1))
    shutil.rmtree(outdir, ignore_errors=True)
    work.rename(outdir)
    report(100, "done")


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python3 -m session_manager.guests.desktop OUTDIR")
    try:
        out = build(Path(sys.argv[1]), progress=lambda p, t: print(f"{p:3d}% {t}", flush=True))
    except BuildError as e:
        sys.exit(str(e))
    print(out)


if __name__ == "__main__":
    main()
