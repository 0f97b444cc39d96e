#!/usr/bin/env bash
# Set up session-manager on a Debian/Ubuntu machine, then run it.
#   packaging/setup.sh run    install, then start the app (and the demo session if you have none)
#   packaging/setup.sh test   install with test dependencies, then run the whole test suite
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
case "$mode" in run|test) ;; *) echo "usage: $0 run|test" >&2; exit 2 ;; esac

sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo

# Debian packages: QEMU, a Python that can make virtual environments, and what Qt loads on X11/Wayland.
apt_packages=(qemu-system-x86 qemu-utils python3-venv
              libegl1 libgl1 libx11-6 libdbus-1-3 libfontconfig1 libfreetype6 libglib2.0-0 libxkbcommon0
              libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-render-util0 libxcb-render0
              libxcb-shape0 libxcb-util1 libxcb-xkb1 libxkbcommon-x11-0)
# The tests also run an X server with a tray, a second VNC server, a key presser, the validators
# of the .desktop and AppStream files, and two "hosts" (network namespaces, a veth, tc).
[ "$mode" = test ] && apt_packages+=(xvfb xauth trayer xdotool tigervnc-standalone-server tigervnc-tools appstream gnome-keyring dbus-daemon
                                     desktop-file-utils iproute2)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
# The test guest is built from Debian's kernel and busybox packages (apt-get download): the
# package lists must know them.
if [ ${#missing[@]} -gt 0 ] || ! apt-cache show linux-image-amd64 busybox-static >/dev/null 2>&1; then
    $sudo apt-get update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "Installing Debian packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
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
    echo "Installing /etc/sysctl.d/60-session-manager.conf (vm.unprivileged_userfaultfd=1) with sudo;"
    echo "without it every checkpoint pauses your session while its memory is copied."
    $sudo install -m 0644 packaging/sysctl.d/60-session-manager.conf /etc/sysctl.d/60-session-manager.conf
    $sudo sysctl -q -p /etc/sysctl.d/60-session-manager.conf
fi

if [ "$mode" = test ]; then
    exec .venv/bin/python -m pytest -ra tests
fi
# The demo session when there is none yet, then the app (headless: the session runs and the CLI drives it).
if [ "$(.venv/bin/session-manager list --json)" = "[]" ]; then
    .venv/bin/session-manager demo
fi
if [ -z "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]; then
    echo "No display here: the session runs headless; use .venv/bin/session-manager (see --help)."
    exec .venv/bin/session-manager list
fi
exec .venv/bin/session-manager
