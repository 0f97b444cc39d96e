"""Desktop benchmark: autosave on the real desktop guest under scripted use, against QEMU's own savevm, in one run.

    .venv/bin/python benchmarks/desktop.py [--minutes 20] [--interval 2] [--memory 2G] [--keys 10] [--savevm 2]

A desktop session (`new --desktop`, the base image built once per machine: tests/helpers/desktop.py) boots to Xfce
and is checkpointed once (#0: nothing in the repository yet). Then for ``--minutes`` a script uses it through
xdotool in the guest, one step at a time: typing a paragraph in Mousepad and saving it, opening xfce4-terminal and
running commands in it, opening firefox-esr on a local page (file:///usr/share/doc/..., no network) and paging
through it, moving each window about, closing each. Whenever ``--interval`` minutes have passed since the previous
checkpoint ended (checked between steps, as autosave's timer would see it), the steps pause and it checkpoints the
way autosave does: the engine's live checkpoint (kind "autosave") on the same asyncio loop as the viewer's RFB
client, as in the app.

Per checkpoint:
- pause and wall time: the checkpoint meta's pause_ms and wall_s;
- added: bytes the repository grew by (its added_bytes), and as a share of the guest's RAM;
- dirtied: RAM pages whose content differs from the previous checkpoint's page at the same address (zero pages
  included), from the stored streams: each segment's record headers give the addresses, its page ids the contents;
- key → screen: through our RFB client (session_manager/rfb.py) on the session's VNC socket, a letter pressed in a
  focused Mousepad window (cursor blink off) until the framebuffer shows its window changed: ``--keys`` presses
  with no checkpoint running just before it, then presses one after another for as long as the checkpoint runs.
The baseline in the same run: HMP ``savevm`` on the same desktop, ``--savevm`` times, with the same key probe.
Then the restore of the last checkpoint (verify, new QEMU, stream loaded, running), and a second desktop from the
same base: its disk overlay after boot, and what its first checkpoint adds to the repository (against the first
desktop's checkpoint #0, which had nothing to share).

Prints Markdown tables (paste them into docs/benchmarks.md). A default run takes about 40 minutes under TCG on 2
cores (boots of two desktops, the first whole checkpoint, 20 minutes of use, the rest), plus the base's build when
this machine has none (SM_TEST_CACHE chooses where it is kept, as for the tests).

    .venv/bin/python benchmarks/desktop.py --viewer [--seconds 10] [--screen 1024x768 --screen 1600x900]

measures the viewer on the desktop's real content instead (about 8 minutes): for each screen size (set through
the spice-vdagent channel, as the window does when it is resized; 1024x768 is what the window opens at) and each
of three kinds of use looping in the guest — scrolling a long text in Mousepad with the mouse wheel, moving a
terminal window about, scrolling a page in Firefox — each encoding set of benchmarks/viewer.py in turn, measured
by its `measure` (update messages and full-screen equivalents per second, the client's CPU per full-screen
equivalent, bytes received, QEMU's CPU share).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shlex
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.common import machine_line, print_table
from benchmarks.viewer import CONFIGS, SCANCODES, measure, ms
from helpers.cli import Sm
from helpers.desktop import Desktop
from session_manager import rfb
from session_manager.local.engine import Engine
from session_manager.paths import Home
from session_manager.store.codec import decode_segment
from session_manager.store.repo import CheckpointInfo, Repository
from session_manager.vm.machine import Machine
from session_manager.vm.qemu import find_qemu, qemu_path
from session_manager.vm.stream import END, F_CONTINUE, F_EOS, F_ZERO, FULL, MAGIC, PAGE_SIZE, PART, START
from session_manager.vm.vdagent import VDAgent

MiB = 1 << 20
NAME = "desk"
PAGE = "file:///usr/share/doc/fontconfig/fontconfig-user.html"  # 44 kB of the guest's own documentation
T = TypeVar("T")
KEY_TIMEOUT = 30  # seconds; a key that changes nothing by then counts as "inf"
TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! ")

# Every script's first lines: `window ARGS...` prints the id of a shown window that `xdotool search ARGS...` finds,
# once it has been there a second (a window found as it appears may be gone again: BadWindow).
WINDOW = r"""
window() {
  for i in $(seq 300); do
    if [ -n "$(xdotool search --onlyvisible "$@" 2>/dev/null)" ]; then
      sleep 1
      w=$(xdotool search --onlyvisible "$@" 2>/dev/null | head -n1)
      if [ -n "$w" ]; then echo $w; return; fi
    fi
    sleep 1
  done
  echo "no window: $*" >&2
  return 1
}
"""
# Run once, as the account: the probe window, no cursor blink (it would change the screen without a key), no
# session restore in Mousepad (a second Mousepad offers it in a dialog), and a Firefox profile that starts without
# first-run pages.
SETUP = r"""
xfconf-query -c xsettings -p /Net/CursorBlink -n -t bool -s false
gsettings set org.xfce.mousepad.preferences.file session-restore never || true
mkdir -p ~/bench-ff && cat > ~/bench-ff/user.js <<'EOF'
user_pref("browser.aboutwelcome.enabled", false);
user_pref("browser.startup.homepage_override.mstone", "ignore");
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("toolkit.telemetry.reportingpolicy.firstRun", false);
user_pref("browser.shell.checkDefaultBrowser", false);
user_pref("browser.sessionstore.resume_from_crash", false);
user_pref("browser.warnOnQuitShortcut", false);
EOF
: > ~/probe.txt
mousepad --disable-server ~/probe.txt >/dev/null 2>&1 &
w=$(window --name 'probe.txt - Mousepad')
xdotool windowmove --sync $w 0 0 windowsize --sync $w 700 400
"""
# The scripted use, a step at a time (each leaves no window of its own open).
STEPS = [
    ("editor", rf"""
f=notes-$(date +%s).txt
: > ~/$f
mousepad --disable-server ~/$f >/dev/null 2>&1 &
for i in $(seq 60); do  # a second Mousepad may first ask whether to restore a session: no
  for d in $(xdotool search --onlyvisible --name '^Mousepad$'); do xdotool windowactivate $d key Escape; done
  if xdotool search --onlyvisible --name "$f - Mousepad" >/dev/null; then break; fi
  sleep 1
done
w=$(window --name "$f - Mousepad")
xdotool windowactivate --sync $w type --delay 40 '{TEXT * 3}'
xdotool key --delay 100 Return ctrl+s
for at in '300 150' '120 300' '400 60'; do xdotool windowmove --sync $w $at; sleep 0.5; done
xdotool windowkill $w
"""),
    ("terminal", r"""
xfce4-terminal --disable-server --geometry 100x30 >/dev/null 2>&1 &
w=$(window --class xfce4-terminal)
xdotool windowactivate --sync $w
sleep 1
xdotool type --delay 40 'ls -l /usr/share/doc | head -n 60; uptime; free -m'
xdotool key Return
sleep 2
for at in '50 50' '350 200' '200 100'; do xdotool windowmove --sync $w $at; sleep 0.5; done
xdotool type --delay 40 'exit'
xdotool key Return
timeout 120 sh -c 'while xdotool search --onlyvisible --class xfce4-terminal >/dev/null; do sleep 0.2; done'
"""),
    ("browser", rf"""
firefox-esr --no-remote --profile ~/bench-ff {PAGE} >/dev/null 2>&1 &
w=$(window --class firefox)
sleep 5
xdotool windowactivate --sync $w key --delay 700 Next Next Next Prior End Home
for at in '100 40' '250 120'; do xdotool windowmove --sync $w $at; sleep 0.5; done
xdotool windowactivate --sync $w key ctrl+q
timeout 120 sh -c 'while pgrep -u $(id -u) -x firefox-esr >/dev/null; do sleep 0.2; done'
"""),
]


def script(desktop: Desktop, text: str, timeout: float = 600) -> str:
    """Run a shell script in the guest as the account, every command of it on the X display."""
    return desktop.out(f"sh -ec {shlex.quote(WINDOW + text)}", timeout=timeout)


# The viewer's kinds of use, each a loop run in the background until it is killed (`pkill -f sm-use`).
LONG_TEXT = "~/long.txt"
USES = [
    ("scrolling a long text in Mousepad (mouse wheel, 3 lines a notch)", rf"""
zcat /usr/share/doc/*/changelog.Debian.gz 2>/dev/null | head -n 20000 > {LONG_TEXT}
mousepad --disable-server {LONG_TEXT} >/dev/null 2>&1 &
w=$(window --name 'long.txt - Mousepad')
xdotool windowactivate --sync $w windowmove --sync $w 0 0 windowsize --sync $w 100% 100%
xdotool mousemove --window $w 300 300
touch ~/sm-use-going
while :; do xdotool click --repeat 40 --delay 30 5; xdotool key ctrl+Home; sleep 0.2; done
"""),
    ("moving a terminal window about", r"""
xfce4-terminal --disable-server --geometry 100x30 -x sh -c 'ls -l /usr/share/doc; exec sh' >/dev/null 2>&1 &
w=$(window --class xfce4-terminal)
touch ~/sm-use-going
while :; do for x in $(seq 0 20 300); do xdotool windowmove $w $x $((x / 2)); sleep 0.02; done
            for x in $(seq 300 -20 0); do xdotool windowmove $w $x $((x / 2)); sleep 0.02; done; done
"""),
    ("scrolling a page in Firefox (mouse wheel)", rf"""
firefox-esr --no-remote --profile ~/bench-ff {PAGE} >/dev/null 2>&1 &
w=$(window --class firefox)
xdotool windowactivate --sync $w windowmove --sync $w 0 0 windowsize --sync $w 100% 100%
sleep 5
xdotool mousemove --window $w 400 400
touch ~/sm-use-going
while :; do xdotool click --repeat 40 --delay 30 5; xdotool key Home; sleep 0.2; done
"""),
]
END_USE = ("rm -f ~/sm-use-going; pkill -f sm-use; pkill -x mousepad; pkill -x xfce4-terminal; pkill -x firefox-esr; "
           "sleep 2")


async def set_screen(desktop: Desktop, width: int, height: int) -> None:
    """Ask the guest for a screen of this size through its spice-vdagent channel, as the window does, and wait
    until X has it."""
    agent = VDAgent(desktop.sockets.vdagent, lambda text: None)
    task = asyncio.create_task(agent.run())
    try:
        agent.set_screen(width, height)
        for _ in range(60):
            out = await asyncio.to_thread(desktop.out, "xrandr | grep -o 'current [0-9]* x [0-9]*'")
            if out.split() == ["current", str(width), "x", str(height)]:
                return
            await asyncio.sleep(1)
        raise SystemExit(f"the guest's screen did not become {width}x{height}: {out.strip()}")
    finally:
        task.cancel()


def viewer_run(a: argparse.Namespace, sm: Sm) -> None:
    print("booting the desktop...", file=sys.stderr)
    desktop = Desktop(sm, NAME).create(memory=a.memory).boot()
    script(desktop, SETUP)
    pid = desktop.sockets.pid()
    assert pid is not None
    results: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for screen in a.screen:
        width, height = (int(n) for n in screen.split("x"))
        asyncio.run(set_screen(desktop, width, height))
        for use, text in USES:
            print(f"{screen}: {use}...", file=sys.stderr)
            desktop.out(f"nohup sh -ec {shlex.quote(WINDOW + text)} sm-use >/dev/null 2>&1 &")
            desktop.out("for i in $(seq 600); do [ -e ~/sm-use-going ] && exit 0; sleep 0.5; done; exit 1",
                        timeout=320)  # the program is up and its loop going
            time.sleep(3)
            for label, encodings in CONFIGS:
                results[screen, use] = results.get((screen, use), {})
                results[screen, use][label] = asyncio.run(measure(desktop.sockets.vnc, encodings, a.seconds, pid))
            desktop.run(END_USE)

    print(f"\n{machine_line()}")
    print(f"Guest: the desktop (Debian 12, Xfce), {a.memory} RAM; {a.seconds:g} s per encoding over the VNC unix "
          "socket, the use looping in the guest all the while. Per cell: update messages per second / full-screen "
          "equivalents per second / client CPU per full-screen equivalent / the client's CPU (share of one core) / "
          "MB received per second / QEMU's CPU (share of one core, the guest's included).\n")
    labels = [label for label, _ in CONFIGS]
    print("| screen | use | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for (screen, use), by_label in results.items():
        cells = [f"{r['updates']:.1f} / {r['screens']:.1f} / {r['cpu_ms']:.2f} ms / {r['client_cpu']:.0f} % / "
                 f"{r['mb_s']:.1f} / "
                 f"{r['server_cpu']:.0f} %" for r in (by_label[label] for label in labels)]
        print(f"| {screen} | {use} | " + " | ".join(cells) + " |")


# -- the guest's responsiveness ----------------------------------------------------------------------------------

class Probe:
    """Key → screen through our RFB client: a letter pressed in the focused probe window until its pixels change."""

    def __init__(self, client: rfb.RfbClient, rect: tuple[int, int, int, int]) -> None:
        self.client = client
        self.rect = rect
        self.presses = 0

    def pixels(self) -> bytes:
        x, y, w, h = self.rect
        fb, stride = self.client.framebuffer, self.client.width * 4
        return b"".join(fb[r * stride + x * 4:r * stride + (x + w) * 4] for r in range(y, y + h))

    async def key(self) -> float:
        ch = "asdfghjkl"[self.presses % 9]
        self.presses += 1
        before = self.pixels()
        changed: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        def on_frame() -> None:
            if not changed.done() and self.pixels() != before:
                changed.set_result(time.monotonic())

        self.client.on_frame = on_frame
        t = time.monotonic()
        self.client.key_event(True, ord(ch), SCANCODES[ch])
        await asyncio.sleep(0.02)
        self.client.key_event(False, ord(ch), SCANCODES[ch])
        try:
            return await asyncio.wait_for(changed, KEY_TIMEOUT) - t
        except TimeoutError:
            print(f"a key pressed in the probe window did not change it within {KEY_TIMEOUT} s", file=sys.stderr)
            return math.inf
        finally:
            self.client.on_frame = None

    async def during(self, work: Awaitable[T]) -> tuple[T, list[float]]:
        """``work``'s result, and the key → screen times of presses made while it ran (one after another)."""
        task = asyncio.ensure_future(work)
        times = []
        while not task.done():
            times.append(await self.key())
            await asyncio.sleep(0.1)
        return await task, times


def probe_window(desktop: Desktop) -> tuple[int, int, int, int]:
    """Focus the probe window; its x, y, width and height."""
    out = script(desktop, "w=$(window --name 'probe.txt - Mousepad'); "
                          "xdotool windowactivate --sync $w getwindowgeometry --shell $w")
    geo = dict(line.split("=", 1) for line in out.split())
    return int(geo["X"]), int(geo["Y"]), int(geo["WIDTH"]), int(geo["HEIGHT"])


async def probing(desktop: Desktop, rect: tuple[int, int, int, int], keys: int, work: Callable[[], Awaitable[T]]
                  ) -> tuple[T, list[float], list[float]]:
    """``keys`` idle key → screen times, then ``work()`` with presses while it runs: (its result, idle, during)."""
    client = await rfb.RfbClient.open_unix(desktop.sockets.vnc)
    first: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_frame() -> None:
        if not first.done():
            first.set_result(None)

    client.on_frame = on_frame
    task = asyncio.create_task(client.run())
    try:
        await asyncio.wait_for(first, 60)
        await asyncio.sleep(1)  # the window's repaint after it was raised
        x, y, w, h = rect
        probe = Probe(client, (x, y, min(w, client.width - x), min(h, client.height - y)))
        idle = [await probe.key() for _ in range(keys)]
        result, during = await probe.during(work())
    finally:
        await client.close()
        await task
    return result, idle, during


# -- pages dirtied between checkpoints ---------------------------------------------------------------------------

def page_contents(repo: Repository, ckpt_id: str) -> dict[bytes, dict[int, bytes]]:
    """RAM block -> address -> page id (b"" for a zero page) of a checkpoint, from its stored segments alone (the
    record headers between the pages, and the pages' ids; see vm/stream.py), without reading a page."""
    out: dict[bytes, dict[int, bytes]] = {}
    block, pages = b"", out.setdefault(b"", {})
    objects = repo.objects
    with objects.lock(False, "the desktop benchmark"):
        table = objects.index()
        segments = objects.segments(ckpt_id)
        for start in range(0, len(segments), 64):
            for plain in objects.fetch(table, segments[start:start + 64], "a segment"):
                data, offsets, ids = decode_segment(plain, "a segment")
                if data[0] == FULL:  # the device state: RAM is done
                    return out
                if data[:4] == MAGIC or data[0] == START:  # the stream's header, the block list: no pages
                    continue
                pos = 5 if data[0] in (PART, END) else 0  # a section header
                page = iter(zip(offsets, ids))
                while pos + 8 <= len(data):
                    header = struct.unpack_from(">Q", data, pos)[0]
                    flags, addr = header & (PAGE_SIZE - 1), header & ~(PAGE_SIZE - 1)
                    pos += 8
                    if flags & F_EOS:
                        break
                    if not flags & F_CONTINUE:
                        block = data[pos + 1:pos + 1 + data[pos]]
                        pos += 1 + data[pos]
                        pages = out.setdefault(block, {})
                    if flags & F_ZERO:
                        pages[addr] = b""
                        pos += 1
                    else:
                        at, pages[addr] = next(page)
                        if at != pos:
                            raise SystemExit(f"checkpoint {ckpt_id}: a segment's page is not where its record is")
    return out


def dirtied(before: dict[bytes, dict[int, bytes]], after: dict[bytes, dict[int, bytes]]) -> int:
    return sum(1 for block, pages in after.items() for addr, content in pages.items()
               if before.get(block, {}).get(addr) != content)


# -- the run -----------------------------------------------------------------------------------------------------

def allocated(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.iterdir())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=20, help="minutes of scripted use")
    ap.add_argument("--interval", type=float, default=2, help="minutes between checkpoints (autosave's default)")
    ap.add_argument("--memory", default="2G", help="guest RAM (as `new --memory`)")
    ap.add_argument("--keys", type=int, default=10, help="idle key presses timed before each checkpoint")
    ap.add_argument("--savevm", type=int, default=2, help="HMP savevm runs, the baseline")
    ap.add_argument("--viewer", action="store_true", help="measure the viewer on the desktop's content instead")
    ap.add_argument("--seconds", type=float, default=10, help="--viewer: measuring time per encoding")
    ap.add_argument("--screen", action="append", help="--viewer: a screen size to measure at (repeat it for more; "
                                                      "default: 1024x768 and 1600x900)")
    a = ap.parse_args()
    a.screen = a.screen or ["1024x768", "1600x900"]
    os.environ.setdefault("SESSION_MANAGER_ACCEL", "tcg")
    work = Path(tempfile.mkdtemp(prefix="sm-desktop-", dir=os.environ.get("BENCH_DIR")))
    sm = Sm(work / "home")
    try:
        (viewer_run if a.viewer else run)(a, sm)
    finally:
        sm.kill_all()
        shutil.rmtree(work, ignore_errors=True)


def run(a: argparse.Namespace, sm: Sm) -> None:
    print("booting the desktop...", file=sys.stderr)
    desktop = Desktop(sm, NAME).create(memory=a.memory).boot()
    engine = Engine(Home.locate(sm.home))
    session = engine.session(NAME)
    ram = session.load_config().memory_mib * MiB
    script(desktop, SETUP)
    desktop.out(f"test -f {PAGE.removeprefix('file://')}")

    async def checkpoint(name: str = NAME) -> CheckpointInfo:
        return await engine.checkpoint(name, kind="autosave")

    def take(at: float) -> dict:
        info, idle, during = asyncio.run(probing(desktop, probe_window(desktop), a.keys, checkpoint))
        print(f"checkpoint {len(rows)}: pause {info.meta.pause_ms:.0f} ms", file=sys.stderr)
        return {"info": info, "at": at, "idle": idle, "during": during, "ended": time.monotonic()}

    rows: list[dict] = []
    overlay_first = allocated(session.disks)
    start = time.monotonic()
    rows.append(take(0))
    steps = 0
    for _ in range(round(a.minutes / a.interval)):
        while time.monotonic() < rows[-1]["ended"] + a.interval * 60:
            what, text = STEPS[steps % len(STEPS)]
            steps += 1
            print(f"step {steps}: {what}", file=sys.stderr)
            script(desktop, text)
        rows.append(take(time.monotonic() - start))
    used = time.monotonic() - start

    async def savevm() -> float:
        async with Machine.connect(desktop.sockets) as m:
            t = time.monotonic()
            said = await m.run("human-monitor-command", {"command-line": "savevm bench"})
            pause = time.monotonic() - t
            if said.strip():
                raise SystemExit(f"savevm: {said.strip()}")
            await m.run("human-monitor-command", {"command-line": "delvm bench"})
        return pause

    savevms = [asyncio.run(probing(desktop, probe_window(desktop), a.keys, savevm)) for _ in range(a.savevm)]

    last = rows[-1]["info"]
    t = time.monotonic()
    asyncio.run(engine.restore(NAME, last.id, discard_current=True))
    restore_s = time.monotonic() - t
    asyncio.run(engine.stop(NAME, save=False))

    print("booting a second desktop from the same base...", file=sys.stderr)
    Desktop(sm, "desk2").create(memory=a.memory).boot()
    overlay_second = allocated(engine.session("desk2").disks)
    second = asyncio.run(checkpoint("desk2"))
    base = Path(session.load_config().base_image or "")
    base_bytes = base.resolve().stat().st_blocks * 512 if base.name else 0

    print("comparing the stored pages...", file=sys.stderr)
    contents = [page_contents(engine.repo, r["info"].id) for r in rows[:2]]
    for i, r in enumerate(rows):
        if i >= 1:
            r["dirtied"] = dirtied(contents[0], contents[1])
            if i + 1 < len(rows):
                contents = [contents[1], page_contents(engine.repo, rows[i + 1]["info"].id)]

    print(f"\n{machine_line()}")
    print(f"Guest: the desktop (Debian 12, Xfce), {a.memory} RAM; {used / 60:.0f} minutes of scripted use "
          f"({steps} steps: editor, terminal, browser in turn), an autosave when {a.interval:g} min had passed since "
          f"the last one; key → screen: median (p90).\n")
    print("| # | at | since the previous | pause | wall | added | of RAM | pages dirtied since the previous "
          "| key → screen, idle | during the checkpoint |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        info = r["info"]
        gap = f"{(r['ended'] - rows[i - 1]['ended']) / 60:.1f} min" if i else "after boot"
        pages = f"{r['dirtied']} ({r['dirtied'] * PAGE_SIZE / MiB:.0f} MiB)" if i else "–"
        print(f"| {i} | {r['at'] / 60:.1f} min | {gap} | {info.meta.pause_ms:.0f} ms | {info.meta.wall_s:.1f} s "
              f"| {info.added_bytes / MiB:.1f} MiB | {info.added_bytes / ram * 100:.1f} % | {pages} "
              f"| {ms(r['idle'])} | {ms(r['during'])} |")

    autosaves = rows[1:]
    pauses = sorted(r["info"].meta.pause_ms for r in autosaves)
    savevm_s = sorted(s for s, _, _ in savevms)
    during = [t for r in autosaves for t in r["during"]]
    during_savevm = [t for _, _, d in savevms for t in d]
    summary = [
        (f"guest pause, median / max of {len(pauses)} autosaves", f"{statistics.median(pauses):.0f} / "
         f"{pauses[-1]:.0f} ms", "HMP savevm " + " / ".join(f"{s:.1f} s" for s in savevm_s),
         f"{statistics.median(pauses) / 1000 / savevm_s[0]:.4f}× savevm"),
        ("key → screen while it runs", ms(during), ms(during_savevm), ""),
        ("key → screen with nothing running", ms([t for r in autosaves for t in r["idle"]]),
         ms([t for _, i, _ in savevms for t in i]), ""),
        ("added to the repository, median / total of the autosaves",
         f"{statistics.median(r['info'].added_bytes for r in autosaves) / MiB:.0f} / "
         f"{sum(r['info'].added_bytes for r in autosaves) / MiB:.0f} MiB", "", ""),
        ("restore of the last checkpoint (verify, start QEMU, load, run)", f"{restore_s:.1f} s", "", ""),
        ("second desktop from the same base: its disk overlay after boot", f"{overlay_second / MiB:.1f} MiB",
         f"first desktop's {overlay_first / MiB:.1f} MiB; the shared base {base_bytes / MiB:.0f} MiB", ""),
        ("… its first checkpoint adds to the repository", f"{second.added_bytes / MiB:.1f} MiB",
         f"first desktop's #0 {rows[0]['info'].added_bytes / MiB:.1f} MiB",
         f"{second.added_bytes / rows[0]['info'].added_bytes:.2f}×"),
    ]
    print()
    print_table([(find_qemu(qemu_path()).version_text, summary)])


if __name__ == "__main__":
    main()
