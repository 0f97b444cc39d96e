"""The session's sound on this computer: the PCM that QEMU's VNC audio extension sends, piped to the player of the
user's sound server (PulseAudio's ``pacat``, else PipeWire's ``pw-cat``).

Why not QtMultimedia's QAudioSink: it comes only in PySide6-Addons, a 175 MB wheel (440 MB installed) beside the
Essentials the app uses, for one feature that every desktop's sound server already offers as a small command that
plays raw PCM from a pipe at a latency we choose.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
from collections.abc import Callable, Sequence

from ..rfb import AUDIO_CHANNELS, AUDIO_RATE

log = logging.getLogger(__name__)

FRAME = 2 * AUDIO_CHANNELS  # bytes of one sample of every channel (s16)
LATENCY_MS = 60  # what the player keeps queued at the sound server
PIPE_SIZE = 16384  # the most we queue before it: 93 ms; beyond that chunks are dropped, so the delay cannot grow
PLAYERS: tuple[tuple[str, ...], ...] = (
    ("pacat", "--playback", "--raw", "--format=s16le", f"--rate={AUDIO_RATE}", f"--channels={AUDIO_CHANNELS}",
     f"--latency-msec={LATENCY_MS}", "--client-name=Session Manager", "--stream-name=Session sound"),
    ("pw-cat", "--playback", "--format=s16", f"--rate={AUDIO_RATE}", f"--channels={AUDIO_CHANNELS}",
     f"--latency={LATENCY_MS}ms", "-"),
)
NO_PLAYER = ("The session's sound cannot play: neither pacat (PulseAudio) nor pw-cat (PipeWire) is installed; "
             "install pulseaudio-utils or pipewire-bin to hear it.")
PLAYER_FAILED = ("The session's sound stopped: {player} could not play it (is your sound server running?); "
                 "press Mute twice to try again.")


class SoundOut:
    """Plays chunks of PCM (AUDIO_RATE, AUDIO_CHANNELS, s16le) as they come, without ever blocking: what does not
    fit into the player's small pipe is dropped (a gap in the sound rather than a growing delay).

    The player starts with the first chunk; ``notice`` gets one sentence, once, when no player can play.
    """

    def __init__(self, notice: Callable[[str], None], players: Sequence[Sequence[str]] | None = None) -> None:
        self._notice = notice
        self._players = players
        self._proc: subprocess.Popen[bytes] | None = None
        self._player = ""
        self._carry = b""  # the rest of a frame a short write split
        self._failed = False  # until stop(): no player could play
        self._told: set[str] = set()

    @property
    def playing(self) -> bool:
        return self._proc is not None

    def play(self, pcm: bytes) -> None:
        if self._failed or (self._proc is None and not self._start()):
            return
        assert self._proc is not None and self._proc.stdin is not None
        data = self._carry + pcm
        try:
            written = os.write(self._proc.stdin.fileno(), data)
        except BlockingIOError:
            written = 0
        except BrokenPipeError:
            self._fail(PLAYER_FAILED.format(player=self._player))
            return
        # Keep whole frames: finish a split one with the next chunk, drop the rest of this one.
        self._carry = data[written:written + (-written % FRAME)]

    def stop(self) -> None:
        """Stop playing; the next chunk starts a player again."""
        proc, self._proc, self._carry, self._failed = self._proc, None, b"", False
        if proc is not None:
            assert proc.stdin is not None
            with contextlib.suppress(OSError):
                proc.stdin.close()
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1)
            if proc.returncode is None:
                proc.kill()
                proc.wait()

    def _start(self) -> bool:
        for argv in PLAYERS if self._players is None else self._players:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
            except FileNotFoundError:
                continue
            assert proc.stdin is not None
            os.set_blocking(proc.stdin.fileno(), False)
            with contextlib.suppress(OSError):
                fcntl.fcntl(proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            log.info("playing the session's sound with %s", argv[0])
            self._proc, self._player = proc, argv[0]
            return True
        self._fail(NO_PLAYER)
        return False

    def _fail(self, message: str) -> None:
        self.stop()
        self._failed = True
        if message not in self._told:
            self._told.add(message)
            log.warning("%s", message)
            self._notice(message)
