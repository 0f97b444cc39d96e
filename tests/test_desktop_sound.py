"""The session's sound (issue #14): a tone played in the desktop guest reaches our RFB client through QEMU's VNC audio
extension as PCM with its energy at the tone's frequency, nothing comes while muted, and the sound card still plays
after a checkpoint and a restore."""

from __future__ import annotations

import asyncio

import pytest

from helpers.aio import until
from helpers.audio import assert_tone, mono
from helpers.desktop import Desktop
from session_manager.rfb import AUDIO_RATE, RfbClient

pytestmark = [pytest.mark.qemu, pytest.mark.desktop]

TONE = 1000
# As the account, through its PulseAudio as every program of the desktop plays; half a second of buffer keeps a TCG
# guest from starving it.
PLAY = f"speaker-test -D pulse -t sine -f {TONE} -c 2 -r {AUDIO_RATE} -l 1 -b 500000 >/dev/null"


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


def test_a_tone_in_the_guest_arrives_as_that_tone_and_not_while_muted(desktop: Desktop) -> None:
    assert_tone(record(desktop), TONE)
    assert record(desktop, muted=True) == []


def test_the_sound_still_arrives_after_a_checkpoint_and_a_restore(desktop: Desktop) -> None:
    ckpt = desktop.sm("checkpoint", desktop.name, "-m", "sound", "--json").json()["id"]
    desktop.sm("restore", desktop.name, ckpt)
    assert_tone(record(desktop), TONE)
