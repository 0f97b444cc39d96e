#!/usr/bin/env python3
"""Build a tiny bootable test guest (kernel + initrd) from Debian packages only.

    python3 -m session_manager.guests.testguest OUTDIR   ->  OUTDIR/vmlinuz, OUTDIR/initrd.img

The kernel is the package that Debian's `linux-image-amd64` currently depends
on; the userland is `busybox-static`. Both are fetched with `apt-get download`
into OUTDIR/cache and unpacked with `dpkg-deb -x` (nothing is installed).

Boot it with e.g.

    qemu-system-x86_64 -accel tcg -m 256 -machine q35 -vga std -display none \\
        -serial stdio -kernel OUTDIR/vmlinuz -initrd OUTDIR/initrd.img \\
        -device qemu-xhci -device usb-tablet \\
        -append "console=ttyS0 quiet sm.fill=64 sm.dirty=4 sm.window=32" \\
        [-drive if=none,id=d0,file=disk.qcow2,format=qcow2 -device virtio-blk-pci,drive=d0]

Kernel command line keys read by /init (all sizes in MiB, all default 0):
    sm.fill=N     fill N MiB of a tmpfs with random data once at boot
    sm.dirty=M    rewrite M MiB with fresh random data every second ...
    sm.window=W   ... cycling through a W MiB tmpfs file (default W = M)
    sm.work=1     work-rate meter: a shell loop counts as fast as it can and prints
                  `work N` every second (benchmarks/backup.py compares the rates)

Serial console protocol (/dev/ttyS0, one whole line per write):
    ready                      workload started and the USB tablet (if any) opened; printed
                               once, before the first counter
    disk ok N                  sector N-1 held "seq N-1", sector N was empty, "seq N" now written
    disk-mismatch at N: ...    that check failed (the record is written anyway)
    counter N                  once a second, N = 1, 2, ...; printed after sector N was written
    work N                     (sm.work=1) about once a second: the meter's loop iterations per
                               second since its previous line, timed by the guest's /proc/uptime
    key X / key #C             a key typed on the VGA console: printable char, else its code
    pointer X Y                the USB tablet's position changed: raw coordinates 0..32767
    click X Y                  its left button went down (after the report's pointer line)
    no USB tablet              an xHCI controller is there, but no tablet showed up within 30 s
    mode WxH                   `M` typed: the display now shows a W x H framebuffer
    paint on / paint off       `P` typed (after `M`): the full-frame painter started / stopped
    power off                  `O` typed: the guest switches itself off (ACPI), as a user's shutdown would

With a virtio disk (/dev/vda) sector N holds "seq N\\n" zero-padded to 512
bytes; a reboot with an old disk continues after the last record. The VGA
text console (tty0) shows the counter in big digits.

`M` loads the std VGA's DRM driver (bochs) with the kernel's built-in 1024x768
EDID: the display switches from 720x400 text to a 1024x768 32-bit framebuffer
(/dev/fb0), and the console with its big digits moves onto it. `P` then
toggles a painter: it unbinds bochs, fills video memory with random data and
flips the display between its five 1024x768 pages every few milliseconds, so
that every display refresh shows a whole new random screen; the console is not
drawn meanwhile. `P` again binds bochs back and the console returns.
"""
from __future__ import annotations

import gzip
import io
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Collection
from pathlib import Path

from ..errors import SessionManagerError

# Loaded at boot: the disk, and the USB tablet as an evdev device.
BOOT_MODULES = ["virtio", "virtio_ring", "virtio_pci", "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev", "virtio_blk", "xhci_pci", "usbhid", "hid_generic", "evdev"]
# Loaded when `M` is typed: the std VGA's DRM driver, whose fbdev emulation makes /dev/fb0.
DISPLAY_MODULES = ["bochs"]
# Loaded when `P` is first typed: phram, an MTD device (/dev/mtd0) over the std VGA's video memory
# (write() on /dev/mem stops at the end of RAM, and busybox has no other way to fill it).
PAINT_MODULES = ["phram"]
# QEMU's EDID prefers 1280x800; the kernel's built-in 1024x768 EDID replaces it. phram's
# parameter names shell variables, expanded when it is loaded.
MODULE_PARAMS = {"drm": "edid_firmware=edid/1024x768.bin", "phram": "phram=vram,$VRAM,$VRAM_SIZE"}

INIT = r"""#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Keep kernel messages off the serial lines we print.
echo 1 > /proc/sys/kernel/printk
exec </dev/null >/dev/ttyS0 2>&1

FILL=0 DIRTY=0 WINDOW=0 WORK=0
for arg in $(cat /proc/cmdline); do
    case $arg in
        sm.fill=*) FILL=${arg#*=} ;;
        sm.dirty=*) DIRTY=${arg#*=} ;;
        sm.window=*) WINDOW=${arg#*=} ;;
        sm.work=*) WORK=${arg#*=} ;;
    esac
done
[ "$WINDOW" -lt "$DIRTY" ] && WINDOW=$DIRTY

load_modules() {
    while read -r m params; do
        eval insmod /lib/modules/$m.ko $params || echo "insmod $m failed"
    done <$1
}
load_modules /etc/modules

mkdir -p /dev/shm
mount -t tmpfs -o size=$((FILL + WINDOW + 4))m shm /dev/shm
[ "$FILL" -gt 0 ] && dd if=/dev/urandom of=/dev/shm/fill bs=1M count=$FILL 2>/dev/null
if [ "$DIRTY" -gt 0 ]; then
    dd if=/dev/zero of=/dev/shm/window bs=1M count=$WINDOW 2>/dev/null
    (
        off=0
        while :; do
            sleep 1 &
            [ $((off + DIRTY)) -gt "$WINDOW" ] && off=0
            dd if=/dev/urandom of=/dev/shm/window bs=1M count=$DIRTY seek=$off conv=notrunc 2>/dev/null
            off=$((off + DIRTY))
            wait $!
        done
    ) &
fi

# The USB tablet's event device, once it is there.
tablet() {
    for f in /sys/class/input/event*/device/name; do
        case $(cat $f 2>/dev/null) in
            *Tablet*) f=${f%/device/name}; echo /dev/input/${f##*/}; return ;;
        esac
    done
}

# Pointer echo: struct input_event is 24 bytes; od prints it as 12 u16 words. dd
# passes on each read() at once (od alone would hold its output back in a buffer).
if grep -qx 0x0c0330 /sys/bus/pci/devices/*/class; then  # an xHCI controller
    t=0
    while [ -z "$(tablet)" ] && [ $t -lt 300 ]; do sleep 0.1; t=$((t + 1)); done
    TABLET=$(tablet)
    [ -n "$TABLET" ] || echo "no USB tablet"
fi
if [ -n "$TABLET" ]; then
    exec 3<$TABLET  # opened before `ready`: from now on the guest polls the tablet
    while :; do
        dd bs=2400 count=1 2>/dev/null | od -An -v -tu2 -w24
    done <&3 | awk -f /etc/pointer.awk &
    exec 3<&-
fi

# The std VGA (PCI class 0x030000): its address, video memory (BAR 0) and registers (BAR 2).
find_vga() {
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat $d/class)" = 0x030000 ] && break
    done
    VGA=${d##*/}
    set -- $(sed -n '1p;3p' $d/resource)
    VRAM=$1 VRAM_SIZE=$(($2 - $1 + 1)) REGS=$(($4))
}

# Full-frame painter. Copying whole frames into /dev/fb0 (3 MB each, copied again by the fbdev
# emulation into video memory) kept the one vCPU busy under TCG, and QEMU, refreshing every 30 ms
# at best, found only part of the screen changed. Instead the painter takes the display from
# bochs-drm, fills video memory with random data (through phram) and flips the display
# between its 768-line pages with the Bochs VBE Y offset register every few milliseconds: each
# refresh finds a whole new screen, and the guest does one devmem per flip. The console is not
# drawn meanwhile; `P` again gives the display back to bochs-drm, which redraws it.
paint_start() {
    lines=$(cut -d, -f2 /sys/class/graphics/fb0/virtual_size)
    screen=$(($(cat /sys/class/graphics/fb0/stride) * lines))
    find_vga
    [ -e /dev/mtd0 ] || load_modules /etc/modules.paint
    echo $VGA > /sys/bus/pci/devices/$VGA/driver/unbind  # frees its BARs for devmem (IO_STRICT_DEVMEM)
    dd if=/dev/urandom of=/dev/mtd0 bs=1M count=$((VRAM_SIZE >> 20)) 2>/dev/null
    devmem $((REGS + 0x41a)) 8 >/dev/null  # VGA 0x3da: the next 0x3c0 write is an attribute index,
    devmem $((REGS + 0x400)) 8 0x20         # here with bit 5 set: unblank (bochs-drm blanked it)
    touch /tmp/painting
    (
        page=0
        while [ -e /tmp/painting ]; do
            devmem $((REGS + 0x512)) 16 $((page * lines))  # VBE_DISPI_INDEX_Y_OFFSET
            page=$(((page + 1) % (VRAM_SIZE / screen)))
            usleep 5000
        done
    ) &
    PAINTER=$!
}

paint_stop() {
    rm /tmp/painting
    wait $PAINTER
    PAINTER=
    echo $VGA > /sys/bus/pci/drivers_probe  # bochs-drm takes the display back; the console redraws
}

# Key echo: one byte at a time from the VGA console's keyboard; M, P and O act.
(
    stty -F /dev/tty0 -icanon -echo -icrnl -isig
    MODE= PAINTER=
    while :; do
        IFS= read -r -n 1 c
        code=10
        [ -n "$c" ] && code=$(printf %d "'$c")
        if [ "$code" -gt 32 ] && [ "$code" -lt 127 ]; then
            echo "key $c"
        else
            echo "key #$code"
        fi
        if [ "$c" = M ] && [ -z "$MODE" ]; then
            load_modules /etc/modules.display
            while [ ! -e /sys/class/graphics/fb0/virtual_size ]; do sleep 0.1; done
            size=$(cat /sys/class/graphics/fb0/virtual_size)
            MODE=${size%,*}x${size#*,}
            echo "mode $MODE"
        elif [ "$c" = P ] && [ -n "$MODE" ] && [ -z "$PAINTER" ]; then
            paint_start
            echo "paint on"
        elif [ "$c" = P ] && [ -n "$PAINTER" ]; then
            paint_stop
            echo "paint off"
        elif [ "$c" = O ]; then
            echo "power off"
            sync
            poweroff -f
        fi
    done </dev/tty0
) &

# Printable text of one sector, read past the page cache.
sector() {
    dd if=/dev/vda bs=512 skip=$1 count=1 iflag=direct 2>/dev/null | tr -cd ' -~'
}

# Number of the last record in the unbroken run "seq 1", "seq 2", ... from sector 1.
last_record() {
    k=0
    while :; do
        r=$(dd if=/dev/vda bs=512 skip=$((k + 1)) count=2048 2>/dev/null |
            strings -t d -n 5 | awk -v k=$k -f /etc/lastrecord.awk)
        [ "${r% more}" = "$r" ] && break
        k=${r% more}
    done
    echo "$r"
}

N=0 DISK=
if [ -b /dev/vda ]; then
    DISK=1
    N=$(last_record)
fi

printf '\033[H\033[2J\033[9;0]\033[?25l' > /dev/tty0
echo ready

# Work-rate meter: the loop counts; every second the ticker's USR1 makes it print its rate
# (iterations per second of /proc/uptime, in centiseconds without the dot) and start again.
work() {
    i=0
    read -r last _ </proc/uptime
    last=${last%.*}${last#*.}
    trap 'read -r up _ </proc/uptime; up=${up%.*}${up#*.}
          [ $up -gt $last ] && echo "work $((i * 100 / (up - last)))"; i=0 last=$up' USR1
    while :; do i=$((i + 1)); done
}
if [ "$WORK" = 1 ]; then
    work &
    WORKER=$!
    ( while sleep 1; do kill -USR1 $WORKER 2>/dev/null; done ) &
fi
while :; do
    sleep 1 &
    N=$((N + 1))
    if [ -n "$DISK" ]; then
        prev=$(sector $((N - 1)))
        cur=$(sector $N)
        if [ $N -gt 1 ] && [ "$prev" != "seq $((N - 1))" ] || [ -n "$cur" ]; then
            status="disk-mismatch at $N: sector $((N - 1)) has '$prev', sector $N has '$cur'"
        else
            status="disk ok $N"
        fi
        echo "seq $N" | dd of=/dev/vda bs=512 seek=$N count=1 conv=notrunc,sync,fsync 2>/dev/null
        echo "$status"
    else
        status="no disk"
    fi
    echo "counter $N"
    awk -v n=$N -v status="$status" -f /etc/bigdigits.awk > /dev/tty0
    wait $!
done
"""

# Input: `strings -t d` of sectors k+1 .. k+2048 ("OFFSET TEXT" lines).
# Prints the last record of the unbroken run, plus " more" if the run reaches the chunk end.
LASTRECORD_AWK = r"""
BEGIN { e = k + 1 }
{
    at = (e - k - 1) * 512
    if ($1 == at && $0 ~ /^ *[0-9]+ seq [0-9]+$/ && $3 == e) e++
    else if ($1 >= at) exit
}
END { print (e - 1) (e - k - 1 == 2048 ? " more" : "") }
"""

# Input: `od -tu2` of struct input_event, 12 words: timeval (8 words), type, code, value (low,
# high word). The values used here (0..32767, 0/1) fit in the low word.
POINTER_AWK = r"""
$9 == 3 && $10 == 0 { x = $11; moved = 1 }
$9 == 3 && $10 == 1 { y = $11; moved = 1 }
$9 == 1 && $10 == 272 && $11 == 1 { click = 1 }
$9 == 0 && $10 == 0 {
    if (moved) print "pointer " x + 0 " " y + 0
    if (click) print "click " x + 0 " " y + 0
    moved = click = 0
}
"""

# Draws n in a scaled 5x7 font of reverse-video cells on an 80x25 text screen.
BIGDIGITS_AWK = r"""
BEGIN {
    split("01110100011001110101110011000101110 00100011000010000100001000010001110 " \
          "01110100010000100010001000100011111 11111000100010000010000011000101110 " \
          "00010001100101010010111110001000010 11111100001111000001000011000101110 " \
          "00110010001000011110100011000101110 11111000010001000100010000100001000 " \
          "01110100011000101110100011000101110 01110100011000101111000010001001100", f, " ")
    nd = length(n)
    sx = int(80 / (6 * nd)); if (sx > 4) sx = 4; if (sx < 1) sx = 1
    cell = sprintf("%" sx "s", "")
    out = "\033[H session-manager test guest\033[K\n\033[K\n\033[K\n"
    for (r = 0; r < 7; r++) {
        line = sprintf("%" int((80 - 6 * sx * nd + sx) / 2) "s", "")
        for (i = 1; i <= nd; i++) {
            bits = f[substr(n, i, 1) + 1]
            for (c = 1; c <= 5; c++)
                line = line (substr(bits, r * 5 + c, 1) == "1" ? "\033[7m" cell "\033[27m" : cell)
            line = line cell
        }
        out = out line "\033[K\n" line "\033[K\n"
    }
    printf "%s\033[K\n counter %d   %s\033[K\n\033[J", out, n, status
}
"""


def run(*cmd: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise SessionManagerError(
            f"The test guest is built from Debian's packages, and this system has no {cmd[0]}; make a session of "
            "your own instead (`session-manager new NAME --iso INSTALLER.iso`)."
        ) from None
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise SessionManagerError(
            f"Building the test guest failed at `{' '.join(cmd)}` ({why}); check that apt can reach Debian's archive."
        )
    return proc.stdout


def download(pkg: str, cache: Path) -> Path:
    debs = sorted(cache.glob(f"{pkg}_*.deb"))
    if not debs:
        run("apt-get", "download", pkg, cwd=cache)
        debs = sorted(cache.glob(f"{pkg}_*.deb"))
    return debs[-1]


def kernel_package() -> str:
    for line in run("apt-cache", "depends", "linux-image-amd64").splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    raise SessionManagerError(
        "Debian's linux-image-amd64 names no kernel package; run `sudo apt-get update` and retry.")


class Cpio:
    """Writer for the newc cpio format that the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 0

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        nlink = 2 if mode & 0o170000 == 0o040000 else 1
        fields = [self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(name) + 1, 0]
        self.buf.write(b"070701" + b"".join(b"%08x" % f for f in fields))
        self.buf.write(name.encode() + b"\0")
        self._pad()
        self.buf.write(data)
        self._pad()

    def dir(self, name: str) -> None:
        self.add(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self.add(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self.add(name, 0o120777, target.encode())

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return self.buf.getvalue()

    def _pad(self) -> None:
        self.buf.write(b"\0" * (-self.buf.tell() % 4))


def module_name(path: Path) -> str:
    return path.name.split(".ko")[0].replace("-", "_")


def module_deps(data: bytes) -> list[str]:
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d] if m else []


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if not path.name.endswith(".ko"):
        raise SessionManagerError(
            f"The kernel module {path.name} uses a compression the test guest builder cannot read.")
    return data


def collect_modules(moddir: Path, wanted: list[str], loaded: Collection[str] = ()) -> list[tuple[str, bytes]]:
    """The wanted modules that this kernel builds as modules, plus dependencies, in load order.

    Modules named in ``loaded`` (loaded already) are left out.
    """
    available = {module_name(p): p for p in (moddir / "kernel").rglob("*.ko*")}
    ordered: dict[str, bytes] = dict.fromkeys(loaded, b"")

    def visit(name: str) -> None:
        if name in ordered:
            return
        data = read_module(available[name])
        for dep in module_deps(data):
            visit(dep)
        ordered[name] = data

    for name in wanted:
        if name in available:  # otherwise built in, or absent from this kernel
            visit(name)
    return [(name, data) for name, data in ordered.items() if name not in loaded]


def up_to_date(outputs: list[Path]) -> bool:
    newest_input = Path(__file__).stat().st_mtime
    return all(p.exists() and p.stat().st_mtime > newest_input for p in outputs)


def build(outdir: Path) -> tuple[Path, Path]:
    outdir = Path(outdir)
    kernel, initrd = outdir / "vmlinuz", outdir / "initrd.img"
    if up_to_date([kernel, initrd]):
        return kernel, initrd
    cache = outdir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    kdeb = download(kernel_package(), cache)
    bdeb = download("busybox-static", cache)

    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        root = Path(tmp)
        run("dpkg-deb", "-x", str(kdeb), str(root / "k"))
        run("dpkg-deb", "-x", str(bdeb), str(root / "b"))
        (vmlinuz,) = (root / "k/boot").glob("vmlinuz-*")
        (moddir,) = (root / "k/lib/modules").iterdir()
        modules = collect_modules(moddir, BOOT_MODULES)
        display_modules = collect_modules(moddir, DISPLAY_MODULES, [name for name, _ in modules])
        paint_modules = collect_modules(moddir, PAINT_MODULES, [name for name, _ in modules + display_modules])
        busybox = root / "b/bin/busybox"
        applets = run(str(busybox), "--list-full").split()

        cpio = Cpio()
        for d in ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "etc", "lib",
                  "lib/modules", "proc", "sys", "tmp"]:
            cpio.dir(d)
        cpio.add("dev/console", 0o020600, rdev=(5, 1))
        cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
        for applet in applets:
            if applet != "bin/busybox":
                cpio.symlink(applet, "/bin/busybox")
        for name, data in modules + display_modules + paint_modules:
            cpio.file(f"lib/modules/{name}.ko", data)
        for listing, mods in [("etc/modules", modules), ("etc/modules.display", display_modules),
                              ("etc/modules.paint", paint_modules)]:
            cpio.file(listing, "".join(f"{name} {MODULE_PARAMS.get(name, '')}\n" for name, _ in mods).encode())
        cpio.file("etc/pointer.awk", POINTER_AWK.encode())
        cpio.file("etc/lastrecord.awk", LASTRECORD_AWK.encode())
        cpio.file("etc/bigdigits.awk", BIGDIGITS_AWK.encode())
        cpio.file("init", INIT.encode(), 0o755)

        tmp_initrd = root / "initrd.img"
        tmp_initrd.write_bytes(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
        shutil.copyfile(vmlinuz, root / "vmlinuz")
        os.replace(root / "vmlinuz", kernel)
        os.replace(tmp_initrd, initrd)
    return kernel, initrd


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUTDIR")
    for path in build(Path(sys.argv[1])):
        print(path)


if __name__ == "__main__":
    main()
