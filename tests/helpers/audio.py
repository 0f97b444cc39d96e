"""Sound for tests: how much of a frequency PCM holds, and a private PulseAudio server with a sink that plays into
nothing but can be recorded."""

from __future__ import annotations

import array
import math
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from session_manager.rfb import AUDIO_RATE

LOUD = 1000  # |sample| of a tone, not silence


def power(samples: list[int], frequency: float) -> float:
    """The energy of ``samples`` at ``frequency`` (Goertzel), per sample."""
    k = 2 * math.cos(2 * math.pi * frequency / AUDIO_RATE)
    s1 = s2 = 0.0
    for x in samples:
        s1, s2 = x + k * s1 - s2, s1
    return (s1 * s1 + s2 * s2 - k * s1 * s2) / len(samples)


def mono(pcm: bytes) -> list[int]:
    """Interleaved s16le stereo to one channel (the sum of both)."""
    frames = array.array("h", pcm[:len(pcm) // 4 * 4])
    return [left + right for left, right in zip(frames[::2], frames[1::2], strict=True)]


def assert_tone(samples: list[int], tone: float, elsewhere: tuple[float, ...] = (440, 2000)) -> None:
    """At least a quarter second of sound arrived, with its energy at ``tone`` rather than ``elsewhere``."""
    loud = [i for i, x in enumerate(samples) if abs(x) > LOUD]
    assert len(loud) > AUDIO_RATE // 4, f"only {len(loud)} loud samples of {len(samples)} arrived"
    start = loud[len(loud) // 4]
    window = samples[start:start + AUDIO_RATE // 10]  # 0.1 s: a whole number of cycles of every frequency used
    for other in elsewhere:
        assert power(window, tone) > 100 * power(window, other), f"no more energy at {tone} Hz than at {other} Hz"


@contextmanager
def pulseaudio(runtime: Path) -> Iterator[dict[str, str]]:
    """A PulseAudio server of its own with one null sink ("null", recorded from "null.monitor"); yields the
    environment that points pacat and parec at it."""
    program = shutil.which("pulseaudio")
    assert program and shutil.which("pacat"), \
        "PulseAudio is missing; install the Debian packages pulseaudio and pulseaudio-utils."
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "HOME": str(runtime),
           "PULSE_SERVER": f"unix:{runtime}/native"}
    server = subprocess.Popen([program, "-n", "--daemonize=no", "--exit-idle-time=-1", "--disable-shm=yes",
                               "--load=module-null-sink sink_name=null",
                               f"--load=module-native-protocol-unix auth-anonymous=1 socket={runtime}/native"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, "PulseAudio did not start"
            time.sleep(0.1)
        yield env
    finally:
        server.terminate()
        server.wait()
