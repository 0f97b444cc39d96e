"""Files in: copy files from this computer into a desktop session's Downloads folder, through its guest agent
(vm/guestagent.py), not a shared folder (9p and virtiofs block migration, and so every checkpoint).

Each file is written under a hidden temporary name in Downloads, then given its name there with ``ln`` (which never
replaces a file: a name taken gets " (2)", " (3)", ... as browsers do) and handed to the account, so a half-copied
file never looks complete.  Nothing is written outside Downloads: a file's name is checked and bounded here first.
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import NotFoundError, UsageError
from ..vm.guestagent import GuestAgent, GuestAgentError
from .engine import Engine

MAX_NAME = 200  # bytes of a name as given (NAME_MAX is 255: room for " (999)" and the temporary name)
MAX_EXTENSION = 16
AGENT_PATIENCE = 15.0  # seconds for the guest agent to answer at all (a busy guest under TCG is slow)

# In the guest, as root: $1 the account.  Its Downloads folder (made, the account's, if it was deleted), printed.
PREPARE = r"""
set -eu
home=$(getent passwd "$1" | cut -d: -f6)
[ -n "$home" ] && [ -d "$home" ] || { echo "the account $1 has no home folder" >&2; exit 3; }
[ -d "$home/Downloads" ] || install -d -o "$1" -g "$(id -g -- "$1")" "$home/Downloads"
printf %s "$home/Downloads"
"""
# $1 the account, $2 Downloads, $3 the temporary file in it, $4 the name's stem, $5 its extension (may be empty).
# The first free name of "stem.ext", "stem (2).ext", ...; ln fails on a name taken, atomically.
FINISH = r"""
set -u
cd -- "$2" || exit 3
chown -- "$1:$(id -g -- "$1")" "$3" && chmod 0644 "$3" || { rm -f -- "$3"; exit 3; }
n=1 name="$4$5"
until ln -- "$3" "$name" 2>/dev/null; do
  if [ ! -e "$name" ] && [ ! -L "$name" ] || [ "$n" -ge 999 ]; then rm -f -- "$3"; echo "cannot name it" >&2; exit 3; fi
  n=$((n + 1)) name="$4 ($n)$5"
done
rm -f -- "$3"
printf %s "$name"
"""


@dataclass(frozen=True)
class CopyIn:
    source: Path
    name: str  # its name in Downloads, as asked (safe_name); it may get " (2)"


def safe_name(name: str) -> str:
    """``name`` as a file name in Downloads: no folder in it, bounded, printable; UsageError (one sentence) for a
    name that cannot be one (empty, ".", "..", with "/" or NUL)."""
    # Undecodable bytes of a file name on this computer: shown as U+FFFD (the guest gets UTF-8)
    name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise UsageError(f"{name!r} cannot be a file name in Downloads; give a name without '/', that is not '.' or "
                         "'..'.")
    name = "".join("_" if ord(c) < 32 or ord(c) == 127 else c for c in name)
    if len(name.encode()) > MAX_NAME:
        stem, extension = _split(name)
        extension = extension if len(extension.encode()) <= MAX_EXTENSION else ""
        room = MAX_NAME - len(extension.encode())
        name = stem.encode()[:room].decode("utf-8", "ignore") + extension
    return name


def _split(name: str) -> tuple[str, str]:
    """Stem and extension, as " (2)" goes between them: "a.pdf" -> ("a", ".pdf"), "a.tar.gz" -> ("a", ".tar.gz"),
    ".bashrc" -> (".bashrc", "")."""
    extension = PurePosixPath(name).suffix
    if extension and PurePosixPath(name[:-len(extension)]).suffix == ".tar":
        extension = ".tar" + extension
    if not extension or extension == name or len(extension.encode()) > MAX_EXTENSION:
        return name, ""
    return name[:-len(extension)], extension


def plan(files: list[Path], as_name: str | None = None) -> list[CopyIn]:
    """What to copy, checked before anything is: each a readable file, each name safe; ``as_name`` names one file."""
    if as_name is not None and len(files) != 1:
        raise UsageError("A name for the copy (--as) names one file; give one file with it.")
    out = []
    for path in files:
        try:
            with open(path, "rb"):
                pass
        except IsADirectoryError:
            raise UsageError(f"{path} is a folder; copy in the files in it (or an archive of it).") from None
        except OSError as e:
            raise NotFoundError(f"{path} cannot be read ({e.strerror}); check its name and permissions.") from None
        if not path.is_file():
            raise UsageError(f"{path} is not a regular file; copy in files only.")
        out.append(CopyIn(path, safe_name(as_name if as_name is not None else path.name)))
    return out


Progress = Callable[[str, float], None]


async def copy_in(engine: Engine, session_name: str, files: list[CopyIn], progress: Progress) -> list[str]:
    """Copy ``files`` into the running desktop session's Downloads; the names they got there, in order."""
    session = engine.session(session_name)
    config = session.load_config()
    if not config.desktop or not config.account:
        raise UsageError(f"Session {session_name} is not a desktop session (`new --desktop`), so it has no Downloads "
                         "folder to copy files into.")
    sockets = engine.sockets(session)
    if sockets.pid() is None:
        raise UsageError(f"Session {session_name} is not running; start it first, then copy the files in.")
    account = config.account.split(" ")[0]
    total = sum(f.source.stat().st_size for f in files)
    names = []

    def report(done: int, what: str, n: int) -> None:
        progress(what, (done + n) / total if total else -1)

    async with GuestAgent.connect(sockets.guest_agent, timeout=AGENT_PATIENCE) as agent:
        folder = (await _run(agent, PREPARE, account)).decode(errors="replace")
        done = 0
        for item in files:
            names.append(await _copy(agent, item, account, folder, functools.partial(report, done)))
            done += item.source.stat().st_size
    return names


async def _copy(agent: GuestAgent, item: CopyIn, account: str, folder: str,
                progress: Callable[[str, int], None]) -> str:
    """Copy one file into ``folder`` (the account's Downloads); the name it got there."""
    what = f"Copying {item.name} into Downloads"
    progress(what, 0)
    temporary = f".session-manager-{secrets.token_hex(8)}.part"
    with open(item.source, "rb") as source:
        await agent.write_file(f"{folder}/{temporary}", source, lambda n: progress(what, n))
    stem, extension = _split(item.name)
    name = (await _run(agent, FINISH, account, folder, temporary, stem, extension)).decode(errors="replace")
    if not re.fullmatch(re.escape(stem) + r"( \([0-9]{1,3}\))?" + re.escape(extension), name):  # it is the guest's word
        raise GuestAgentError(f"The session said it saved {item.name} under a name it was not given.")
    return name


async def _run(agent: GuestAgent, script: str, *args: str) -> bytes:
    result = await agent.exec(["/bin/sh", "-c", script, "sh", *args])
    if result.exitcode != 0 or len(result.stdout) > 4096 or b"\0" in result.stdout:
        why = result.stderr.decode(errors="replace").strip()[:200] or f"exit status {result.exitcode}"
        raise GuestAgentError(f"The session could not take the file into Downloads ({why}); is its disk full?")
    return result.stdout
