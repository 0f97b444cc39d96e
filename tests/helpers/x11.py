"""X servers: what the xvfb fixture yields, and python-xlib connections."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass


@dataclass
class Xvfb:
    display: str         # ":N"
    env: dict[str, str]  # os.environ with DISPLAY=:N and QT_QPA_PLATFORM=xcb

    def xdotool(self, *args: str) -> None:
        subprocess.run(["xdotool", *args], env=self.env, check=True, timeout=10)


def xlib_display(name: str):
    """A python-xlib connection to ``name``.

    python-xlib keeps its table of extension events on the class, shared by every connection in the
    process; X servers number their extensions' events differently (Xvfb, Xvnc), so a connection to
    one server breaks the next connection to another.  Start each from the pristine table.
    """
    from Xlib import display
    from Xlib.protocol import display as protocol
    from Xlib.protocol import event

    protocol.Display.event_classes = event.event_class.copy()
    return display.Display(name)
