#!/usr/bin/env bash
# Unpack QEMU from Debian 12's backports (10.0 today) into DIR and print the path of its qemu-system-x86_64.
#   packaging/newer-qemu.sh DIR
# Nothing is installed and the system's apt configuration is not touched: apt works on a private list and
# cache in a temporary directory, from the Debian mirror this machine already uses, so an ordinary user can
# do it too.  session-manager finds the firmware and modules beside such a binary by itself; point the `qemu`
# setting (settings.toml) or SESSION_MANAGER_QEMU at it.  The tests run their QEMU part on it as well.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
dir=$1
bin="$dir/usr/bin/qemu-system-x86_64"
if [ -x "$bin" ]; then
    echo "$bin"
    exit 0
fi
suite=bookworm
uri=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null | awk -v s="$suite" '$2 == s {print $1; exit}')
if [ -z "$uri" ]; then
    echo "newer-qemu.sh: this machine has no Debian 12 ($suite) package source, so $suite-backports cannot be" \
         "used here; install a QEMU of 8.0 or newer from your distribution instead." >&2
    exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work" "$dir.part"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
echo "deb $uri $suite-backports main" >"$work/sources.list"
apt=(apt-get -q -o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Debug::NoLocking=1
     -o "APT::Sandbox::User=$(id -un)")
"${apt[@]}" update >"$work/apt.log" 2>&1 || { cat "$work/apt.log" >&2; exit 1; }
packages=(qemu-system-x86 qemu-system-common qemu-system-data qemu-utils)
(cd "$work/debs" && "${apt[@]}" download "${packages[@]/%//$suite-backports}" >"$work/apt.log" 2>&1) \
    || { cat "$work/apt.log" >&2; exit 1; }
rm -rf "$dir.part"
mkdir -p "$dir.part"
for deb in "$work"/debs/*.deb; do
    dpkg-deb -x "$deb" "$dir.part"
done
mkdir -p "$(dirname "$dir")"
mv "$dir.part" "$dir"
echo "$bin"
