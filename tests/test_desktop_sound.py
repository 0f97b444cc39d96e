"""The session's sound (issue #14): a tone played in the desktop guest reaches our RFB client through QEMU's VNC audio
extension as PCM with its energy at the tone's frequency, nothing comes while muted, and the sound card still plays
after a checkpoint and a restore."""

from __future__ import annotations

import array
import asyncio
import math

import pytest

from helpers.aio import until
from helpers.desktop import Desktop
from session_manager.rfb import AUDIO_RATE, RfbClient

pytestmark = [pytest.mark.qemu, pytest.mark.desktop]

TONE = 1000
ELSEWHERE = (440, 2000)
# As the account, straight to the sound card's ALSA device; half a second of buffer keeps a TCG guest from starving it.
PLAY = f"speaker-test -D hw:0 -t sine -f {TONE} -c 2 -r {AUDIO_RATE} -l 1 -b 500000 >/dev/null"
LOUD = 1000  # |sample| of a tone, not silence


def power(samples: list[int], frequency: float) -> float:
    """The energy of ``samples`` at ``frequency`` (Goertzel), per sample."""
    k = 2 * math.cos(2 * math.pi * frequency / AUDIO_RATE)
    s1 = s2 = 0.0
    for x in samples:
        s1, s2 = x + k * s1 - s2, s1
    return (s1 * s1 + s2 * s2 - k * s1 * s2) / len(samples)


def mono(pcm: bytes) -> list[int]:
    """Interleaved s16le stereo to one channel (speaker-test sounds one channel at a time)."""
    frames = array.array("h", pcm[:len(pcm) // 4 * 4])
    return [left + right for left, right in zip(frames[::2], frames[1::2], strict=True)]


def record(desktop: Desktop, muted: bool = False) -> list[int]:
    """What our client receives while the guest plays the tone."""
    async def go() -> list[int]:
        client = await RfbClient.open_unix(desktop.sockets.vnc)
        chunks: list[bytes] = []
        client.on_audio = chunks.append
        task = asyncio.create_task(client.run())
        client.set_audio(not muted)
        await until(lambda: client.supports_audio, "QEMU acknowledging its audio extension")
        await asyncio.to_thread(desktop.out, PLAY, timeout=180)
        await asyncio.sleep(0.5)  # the end of the tone, still on its way
        await client.close()
        await task
        return mono(b"".join(chunks))
    return asyncio.run(go())


def assert_tone(samples: list[int]) -> None:
    loud = [i for i, x in enumerate(samples) if abs(x) > LOUD]
    assert len(loud) > AUDIO_RATE // 4, f"only {len(loud)} loud samples of {len(samples)} arrived"
    start = loud[len(loud) // 4]
    window = samples[start:start + AUDIO_RATE // 10]  # 0.1 s: a whole number of cycles of every frequency here
    tone = power(window, TONE)
    for other in ELSEWHERE:
        assert tone > 100 * power(window, other), f"no more energy at {TONE} Hz than at {other} Hz"


def test_a_tone_in_the_guest_arrives_as_that_tone_and_not_while_muted(desktop: Desktop) -> None:
    assert_tone(record(desktop))
    assert record(desktop, muted=True) == []


def test_the_sound_still_arrives_after_a_checkpoint_and_a_restore(desktop: Desktop) -> None:
    ckpt = desktop.sm("checkpoint", desktop.name, "-m", "sound", "--json").json()["id"]
    desktop.sm("restore", desktop.name, ckpt)
    assert_tone(record(desktop))
