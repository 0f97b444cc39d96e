#!/usr/bin/env bash
# Set up session-manager on a Debian/Ubuntu machine, then run it.
#   packaging/setup.sh run        install, then start the app; with no session yet, first make your desktop (a
#                                 Debian desktop built from Debian's packages: about 3 minutes and 1.7 GB, once)
#   packaging/setup.sh run demo   the same, but with the small demo guest (seconds) when you have no session
#   packaging/setup.sh test       install with test dependencies, then run the whole test suite
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
first=${2:-desktop}
case "$mode $first" in "run desktop"|"run demo"|"test desktop") ;; *) echo "usage: $0 run [demo] | test" >&2; exit 2 ;; esac

# As root nothing needs sudo; otherwise sudo is used only when something must be installed, and if it is missing
# or refused, the user is told what to ask an administrator for.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        return 127
    fi
}

# Debian packages: QEMU, a Python that can make virtual environments, what builds the desktop image (also as an
# ordinary user: uidmap) and hashes its password, and what Qt loads on X11/Wayland.
apt_packages=(qemu-system-x86 qemu-utils python3-venv mmdebstrap uidmap openssl
              libegl1 libgl1 libx11-6 libdbus-1-3 libfontconfig1 libfreetype6 libglib2.0-0 libxkbcommon0
              libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-render-util0 libxcb-render0
              libxcb-shape0 libxcb-util1 libxcb-xkb1 libxkbcommon-x11-0)
# The tests also run an X server with a tray, a second VNC server, a key presser, the validators
# of the .desktop and AppStream files, two "hosts" (network namespaces, a veth, tc) and a sound server.
[ "$mode" = test ] && apt_packages+=(xvfb xauth trayer xdotool tigervnc-standalone-server tigervnc-tools appstream gnome-keyring dbus-daemon
                                     desktop-file-utils iproute2 pulseaudio pulseaudio-utils)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "Installing Debian packages: ${missing[*]}"
    if ! { as_root apt-get update -q && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q --no-install-recommends "${missing[@]}"; }; then
        echo "setup.sh: these Debian packages are missing and could not be installed without an administrator:" >&2
        echo "  ${missing[*]}" >&2
        echo "Ask one to run: sudo apt-get install ${missing[*]}; then run $0 $mode again." >&2
        exit 1
    fi
fi
# The test guest (the demo, the tests) is built from Debian's kernel and busybox packages (apt-get download):
# the package lists must know them.
if ! apt-cache show linux-image-amd64 busybox-static >/dev/null 2>&1; then
    as_root apt-get update -q || echo "The package lists do not know linux-image-amd64 and busybox-static, which" \
        "the demo session is built from, and could not be updated without an administrator."
fi

# The Python environment.
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
extras=""
[ "$mode" = test ] && extras="[test]"
.venv/bin/pip install -q --disable-pip-version-check -e ".$extras"

# Live checkpoints need userfaultfd, which Debian/Ubuntu deny ordinary users.
if [ "$(id -u)" -ne 0 ] && [ "$mode" = run ] \
   && [ "$(cat /proc/sys/vm/unprivileged_userfaultfd 2>/dev/null || echo 0)" != 1 ]; then
    echo "Live checkpoints need userfaultfd, which this system allows only to root."
    echo "Installing /etc/sysctl.d/60-session-manager.conf (vm.unprivileged_userfaultfd=1) with sudo..."
    if ! { as_root install -m 0644 packaging/sysctl.d/60-session-manager.conf /etc/sysctl.d/60-session-manager.conf \
           && as_root sysctl -q -p /etc/sysctl.d/60-session-manager.conf; }; then
        echo "Not done: sudo is missing here or was refused. Checkpoints still work, but each one pauses your session while its memory"
        echo "is copied (about a second per GB) instead of a few milliseconds. To get live checkpoints, ask an"
        echo "administrator to run: sudo install -m 0644 $PWD/packaging/sysctl.d/60-session-manager.conf /etc/sysctl.d/ && sudo sysctl --system"
    fi
fi

if [ "$mode" = test ]; then
    # Everything on the system's QEMU, then the tests that run QEMU again on a current one: on Debian 12, whose
    # QEMU is 7.2, the 10.0 of its backports, unpacked beside the project (packaging/newer-qemu.sh).
    status=0
    echo "Linters: ruff (the rules in pyproject.toml) and mypy (strict for vm/, store/ and the leaf modules)"
    .venv/bin/ruff check . || status=$?
    .venv/bin/mypy || status=$?
    .venv/bin/python -m pytest -ra tests || status=$?
    system=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p;q')
    if [ "$system" -lt 8 ]; then
        newer=$(packaging/newer-qemu.sh "$PWD/.cache/qemu-backports")
        echo "The tests that run QEMU, again on $("$newer" --version | head -1)"
        SESSION_MANAGER_QEMU=$newer .venv/bin/python -m pytest -ra -m qemu tests || status=$?
    else
        echo "The system's QEMU is current (version $system), so the tests ran on it alone."
    fi
    exit $status
fi
# The desktop (or the demo) when there is no session yet, then the app (headless: the session runs and the CLI
# drives it).
if [ "$(.venv/bin/session-manager list --json)" = "[]" ]; then
    if [ "$first" = demo ]; then
        .venv/bin/session-manager demo
    else
        .venv/bin/session-manager new desktop --desktop
        .venv/bin/session-manager start desktop
    fi
fi
if [ -z "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]; then
    echo "No display here: the session runs headless; use .venv/bin/session-manager (see --help)."
    exec .venv/bin/session-manager list
fi
exec .venv/bin/session-manager
