"""Key translation for the viewer: Linux evdev codes and Qt keys to XT scancodes, Qt keys to X keysyms.

QEMU's Extended Key Event carries XT set 1 scancodes in QEMU's "qnum" form: a one-byte code, with the
0xE0-prefixed (extended) keys written as ``0x80 | code``.  Sending scancodes rather than keysyms makes
every keyboard layout work: the guest applies its own layout to the physical key.

On X11 and Wayland, ``QKeyEvent.nativeScanCode()`` is the X/xkb keycode, the evdev code plus 8.
Elsewhere (the offscreen platform, synthesised events) it is 0, and the key is looked up from
``Qt.Key`` or from the typed character on a US layout.
"""

from __future__ import annotations

from PySide6.QtCore import Qt

X_KEYCODE_OFFSET = 8
"""X and xkb keycodes are Linux evdev codes plus 8."""

EXTENDED = 0x80
"""The qnum bit of an 0xE0-prefixed XT scancode."""

# Linux evdev code (linux/input-event-codes.h) -> XT set 1 scancode in qnum form; the inverse of the
# kernel's AT keyboard translation, as in keycodemapdb's linux -> qnum map.
EVDEV_TO_XT: dict[int, int] = {
    # KEY_ESC (1) .. KEY_KPDOT (83) are the XT scancodes themselves.
    **{code: code for code in range(1, 84)},
    85: 0x76,  # KEY_ZENKAKUHANKAKU
    86: 0x56,  # KEY_102ND (the extra key left of Z on ISO keyboards)
    87: 0x57,  # KEY_F11
    88: 0x58,  # KEY_F12
    89: 0x73,  # KEY_RO
    90: 0x78,  # KEY_KATAKANA
    91: 0x77,  # KEY_HIRAGANA
    92: 0x79,  # KEY_HENKAN
    93: 0x70,  # KEY_KATAKANAHIRAGANA
    94: 0x7B,  # KEY_MUHENKAN
    95: 0x5C,  # KEY_KPJPCOMMA
    96: 0x9C,  # KEY_KPENTER          e0 1c
    97: 0x9D,  # KEY_RIGHTCTRL        e0 1d
    98: 0xB5,  # KEY_KPSLASH          e0 35
    99: 0xB7,  # KEY_SYSRQ: the Print Screen key, e0 37 (what the key sends on a real keyboard)
    100: 0xB8,  # KEY_RIGHTALT        e0 38
    102: 0xC7,  # KEY_HOME            e0 47
    103: 0xC8,  # KEY_UP              e0 48
    104: 0xC9,  # KEY_PAGEUP          e0 49
    105: 0xCB,  # KEY_LEFT            e0 4b
    106: 0xCD,  # KEY_RIGHT           e0 4d
    107: 0xCF,  # KEY_END             e0 4f
    108: 0xD0,  # KEY_DOWN            e0 50
    109: 0xD1,  # KEY_PAGEDOWN        e0 51
    110: 0xD2,  # KEY_INSERT          e0 52
    111: 0xD3,  # KEY_DELETE          e0 53
    113: 0xA0,  # KEY_MUTE            e0 20
    114: 0xAE,  # KEY_VOLUMEDOWN      e0 2e
    115: 0xB0,  # KEY_VOLUMEUP        e0 30
    116: 0xDE,  # KEY_POWER           e0 5e
    117: 0x59,  # KEY_KPEQUAL
    119: 0xC6,  # KEY_PAUSE           (qnum's code for e1 1d 45)
    121: 0x7E,  # KEY_KPCOMMA
    122: 0xF2,  # KEY_HANGEUL
    123: 0xF1,  # KEY_HANJA
    124: 0x7D,  # KEY_YEN
    125: 0xDB,  # KEY_LEFTMETA        e0 5b
    126: 0xDC,  # KEY_RIGHTMETA       e0 5c
    127: 0xDD,  # KEY_COMPOSE (Menu)  e0 5d
    128: 0xE8,  # KEY_STOP            e0 68
    129: 0x85,  # KEY_AGAIN           e0 05
    130: 0x86,  # KEY_PROPS           e0 06
    131: 0x87,  # KEY_UNDO            e0 07
    132: 0x8C,  # KEY_FRONT           e0 0c
    133: 0xF8,  # KEY_COPY            e0 78
    134: 0xE4,  # KEY_OPEN            e0 64
    135: 0xE5,  # KEY_PASTE           e0 65
    136: 0xC1,  # KEY_FIND            e0 41
    137: 0xBC,  # KEY_CUT             e0 3c
    138: 0xF5,  # KEY_HELP            e0 75
    140: 0xA1,  # KEY_CALC            e0 21
    142: 0xDF,  # KEY_SLEEP           e0 5f
    143: 0xE3,  # KEY_WAKEUP          e0 63
    155: 0xEC,  # KEY_MAIL            e0 6c
    156: 0xE6,  # KEY_BOOKMARKS       e0 66
    157: 0xEB,  # KEY_COMPUTER        e0 6b
    158: 0xEA,  # KEY_BACK            e0 6a
    159: 0xE9,  # KEY_FORWARD         e0 69
    163: 0x99,  # KEY_NEXTSONG        e0 19
    164: 0xA2,  # KEY_PLAYPAUSE       e0 22
    165: 0x90,  # KEY_PREVIOUSSONG    e0 10
    166: 0xA4,  # KEY_STOPCD          e0 24
    172: 0xB2,  # KEY_HOMEPAGE        e0 32
    173: 0xE7,  # KEY_REFRESH         e0 67
}


def evdev_to_xt(code: int) -> int | None:
    """The XT scancode (qnum) of a Linux evdev key code, or None for keys without one."""
    return EVDEV_TO_XT.get(code)


def x_keycode_to_xt(keycode: int) -> int | None:
    """The XT scancode of an X11/xkb keycode (``QKeyEvent.nativeScanCode()`` on xcb and Wayland)."""
    return evdev_to_xt(keycode - X_KEYCODE_OFFSET) if keycode > X_KEYCODE_OFFSET else None


# Printable characters on a US keyboard: character -> (XT scancode, needs Shift).
_US_ROWS = [
    (0x02, "1234567890-=", "!@#$%^&*()_+"),
    (0x10, "qwertyuiop[]", "QWERTYUIOP{}"),
    (0x1E, "asdfghjkl;'`", 'ASDFGHJKL:"~'),
    (0x2B, "\\zxcvbnm,./", "|ZXCVBNM<>?"),
]
US_CHARS: dict[str, tuple[int, bool]] = {" ": (0x39, False)}
for _first, _plain, _shifted in _US_ROWS:
    for _i, (_p, _s) in enumerate(zip(_plain, _shifted, strict=True)):
        US_CHARS[_p] = (_first + _i, False)
        US_CHARS[_s] = (_first + _i, True)


def char_to_xt(ch: str) -> tuple[int, bool] | None:
    """The US-layout key of a printable ASCII character: (XT scancode, needs Shift)."""
    return US_CHARS.get(ch)


K = Qt.Key
# Non-printable Qt keys -> (XT scancode, X keysym).
_SPECIAL: dict[Qt.Key, tuple[int, int]] = {
    K.Key_Escape: (0x01, 0xFF1B),
    K.Key_Tab: (0x0F, 0xFF09),
    K.Key_Backtab: (0x0F, 0xFE20),  # ISO_Left_Tab: Shift+Tab
    K.Key_Backspace: (0x0E, 0xFF08),
    K.Key_Return: (0x1C, 0xFF0D),
    K.Key_Enter: (0x9C, 0xFF8D),  # keypad Enter
    K.Key_Insert: (0xD2, 0xFF63),
    K.Key_Delete: (0xD3, 0xFFFF),
    K.Key_Pause: (0xC6, 0xFF13),
    K.Key_Print: (0xB7, 0xFF61),
    K.Key_SysReq: (0x54, 0xFF15),
    K.Key_Home: (0xC7, 0xFF50),
    K.Key_End: (0xCF, 0xFF57),
    K.Key_Left: (0xCB, 0xFF51),
    K.Key_Up: (0xC8, 0xFF52),
    K.Key_Right: (0xCD, 0xFF53),
    K.Key_Down: (0xD0, 0xFF54),
    K.Key_PageUp: (0xC9, 0xFF55),
    K.Key_PageDown: (0xD1, 0xFF56),
    K.Key_Shift: (0x2A, 0xFFE1),
    K.Key_Control: (0x1D, 0xFFE3),
    K.Key_Meta: (0xDB, 0xFFEB),  # Qt calls the Super/Windows key Meta on Linux
    K.Key_Super_L: (0xDB, 0xFFEB),
    K.Key_Super_R: (0xDC, 0xFFEC),
    K.Key_Alt: (0x38, 0xFFE9),
    K.Key_AltGr: (0xB8, 0xFE03),  # ISO_Level3_Shift
    K.Key_CapsLock: (0x3A, 0xFFE5),
    K.Key_NumLock: (0x45, 0xFF7F),
    K.Key_ScrollLock: (0x46, 0xFF14),
    K.Key_Menu: (0xDD, 0xFF67),
    K.Key_F11: (0x57, 0xFFC8),
    K.Key_F12: (0x58, 0xFFC9),
    **{K(K.Key_F1.value + i): (0x3B + i, 0xFFBE + i) for i in range(10)},
}
SPECIAL_KEYS: dict[int, tuple[int, int]] = {k.value: v for k, v in _SPECIAL.items()}

# Keys with Qt's KeypadModifier: character -> (XT scancode, keysym).
KEYPAD: dict[str, tuple[int, int]] = {
    **{str(n): (xt, 0xFFB0 + n) for n, xt in
       enumerate([0x52, 0x4F, 0x50, 0x51, 0x4B, 0x4C, 0x4D, 0x47, 0x48, 0x49])},
    ".": (0x53, 0xFFAE),
    ",": (0x53, 0xFFAC),
    "+": (0x4E, 0xFFAB),
    "-": (0x4A, 0xFFAD),
    "*": (0x37, 0xFFAA),
    "/": (0xB5, 0xFFAF),
}


def qt_key_to_xt(key: int, keypad: bool = False) -> int | None:
    """The XT scancode of a ``Qt.Key`` on a US layout (Shift state aside), or None."""
    if keypad and 0x20 <= key < 0x7F and chr(key) in KEYPAD:
        return KEYPAD[chr(key)][0]
    if key in SPECIAL_KEYS:
        return SPECIAL_KEYS[key][0]
    if 0x20 <= key < 0x7F:
        hit = char_to_xt(chr(key).lower()) or char_to_xt(chr(key))
        return hit[0] if hit else None
    return None


def char_keysym(ch: str) -> int:
    """The X keysym of a character: Latin-1 maps to itself, everything else to 0x01000000 + code point."""
    code = ord(ch)
    return code if 0x20 <= code < 0x7F or 0xA0 <= code <= 0xFF else 0x01000000 + code


def keysym(key: int, text: str = "", keypad: bool = False, shift: bool = False) -> int | None:
    """The X keysym of a key event: from its text when printable, else from its ``Qt.Key``."""
    if keypad and 0x20 <= key < 0x7F and chr(key) in KEYPAD:
        return KEYPAD[chr(key)][1]
    if key in SPECIAL_KEYS:
        return SPECIAL_KEYS[key][1]
    if len(text) == 1 and text.isprintable():
        return char_keysym(text)
    if 0x20 <= key < 0x7F:  # no usable text, e.g. with Ctrl held: Qt.Key_A is 'A'
        ch = chr(key)
        return ord(ch if shift else ch.lower())
    return None
