"""The session's sound on this computer (services/sound.py): PCM piped to a player, never blocking, one sentence when
nothing can play it: pacat into a PulseAudio server of the test's own, and stand-ins for the corners.  The guest's
sound is in test_desktop_sound.py."""

from __future__ import annotations

import array
import math
import subprocess
import time
from pathlib import Path

import pytest

from helpers.audio import assert_tone, mono, pulseaudio
from session_manager.rfb import AUDIO_RATE
from session_manager.services.sound import NO_PLAYER, PLAYER_FAILED, PLAYERS, SoundOut


def test_the_sound_reaches_the_player_in_whole_frames(tmp_path: Path) -> None:
    out = tmp_path / "played.raw"
    told: list[str] = []
    sound = SoundOut(told.append, players=[("no-such-player",), ("sh", "-c", f"cat > {out}")])
    chunks = [bytes(range(i, i + 16)) for i in range(0, 160, 16)]
    for chunk in chunks:
        sound.play(chunk)
    assert sound.playing
    deadline = time.monotonic() + 30
    while (not out.exists() or out.stat().st_size < 160) and time.monotonic() < deadline:
        time.sleep(0.01)
    sound.stop()
    assert out.read_bytes() == b"".join(chunks)
    assert not told and not sound.playing


def test_a_stalled_player_drops_sound_instead_of_blocking() -> None:
    sound = SoundOut(lambda message: None, players=[("sleep", "60")])
    for _ in range(200):
        sound.play(bytes(4096))  # 800 KiB into a pipe of 16 KiB that nobody reads: a blocking write would hang here
    assert sound.playing
    sound.stop()


def test_one_sentence_when_nothing_can_play() -> None:
    told: list[str] = []
    sound = SoundOut(told.append, players=[("no-such-player",)])
    sound.play(bytes(4))
    sound.play(bytes(4))
    assert told == [NO_PLAYER] and not sound.playing
    assert [p[0] for p in PLAYERS] == ["pacat", "pw-cat"] and "pacat" in NO_PLAYER

    gone = SoundOut(told.append, players=[("true",)])  # a player that ends at once, as pacat without a server
    gone.play(bytes(4))
    time.sleep(0.5)
    for _ in range(3):
        gone.play(bytes(4))
    assert told[1:] == [PLAYER_FAILED.format(player="true")]


def test_pacat_plays_it_on_a_sound_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pulseaudio(tmp_path) as env:
        for name in ("XDG_RUNTIME_DIR", "HOME", "PULSE_SERVER"):
            monkeypatch.setenv(name, env[name])
        recording = tmp_path / "recorded.raw"
        with open(recording, "wb") as out:
            recorder = subprocess.Popen(["parec", "-d", "null.monitor", "--raw", "--format=s16le",
                                         f"--rate={AUDIO_RATE}", "--channels=2", "--latency-msec=20"], stdout=out)
        told: list[str] = []
        sound = SoundOut(told.append)
        sound.play(bytes(4))  # starts pacat; what comes before it has connected is dropped
        deadline = time.monotonic() + 30
        # until parec records and pacat is connected
        while not (recording.stat().st_size and subprocess.run(["pactl", "list", "short", "sink-inputs"],
                                                                capture_output=True).stdout):
            assert time.monotonic() < deadline, "parec and pacat did not start"
            time.sleep(0.1)
        step = AUDIO_RATE // 100
        for at in range(0, AUDIO_RATE, step):  # one second of 1000 Hz in 10 ms chunks, about as QEMU sends them
            wave = (round(8000 * math.sin(2 * math.pi * 1000 * n / AUDIO_RATE)) for n in range(at, at + step))
            sound.play(array.array("h", (v for v in wave for _ in range(2))).tobytes())
            time.sleep(0.01)
        assert sound.playing
        time.sleep(0.5)  # the end of it, through the server
        sound.stop()
        recorder.terminate()
        recorder.wait()
    assert not told
    assert_tone(mono(recording.read_bytes()), 1000)
