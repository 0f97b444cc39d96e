"""The session's sound on this computer (services/sound.py): PCM piped to a player, never blocking, one sentence when
nothing can play it.  The players here stand in for pacat: the real guest's sound is in test_desktop_sound.py."""

from __future__ import annotations

import time
from pathlib import Path

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
