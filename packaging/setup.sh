#!/usr/bin/env bash
# Set up session-manager on a Debian/Ubuntu machine, then run it.
#   packaging/setup.sh demo   install, then start the demo session (the main job)
#   packaging/setup.sh test   install with test dependencies, then run the whole test suite
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-demo}
case "$mode" in demo|test) ;; *) echo "usage: $0 demo|test" >&2; exit 2 ;; esac

sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo

# Debian packages: QEMU and a Python that can make virtual environments.
apt_packages=(qemu-system-x86 qemu-utils python3-venv)
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
if [ "$(id -u)" -ne 0 ] && [ "$mode" = demo ] \
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
exec .venv/bin/session-manager demo
