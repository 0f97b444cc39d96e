"""What the tests share, as a library: test modules import from here, never from one another, and conftest.py holds
only fixtures and hooks (built on these).

- cli: ``Sm``, ``session-manager`` run as its own process, and its result ``Run``; ``one_sentence`` (a refusal in
  one sentence); ``log_text`` and ``wait_log`` (an installation's log).
- qemu: QEMU and the test guest: ``Serial`` (its serial log), ``keeps_running``, ``seq_records`` (its disk records),
  ``two_checkpoints``, a migration's ``Source`` (``start_source``, ``pattern_intact``), ``QmpClient`` (synchronous QMP
  over a socket), ``SessionQmp`` (QMP of a session by name), ``self_signed`` and ``tls_dir`` (TLS for two QEMUs).
- net: ``free_port``/``free_ports``; two installations: ``serving``, ``pair_by_ids``, ``paired_homes``, ``my_id``,
  ``NsSm`` (the CLI in a network namespace).
- stream: migration streams: ``Synthetic`` (built by hand), ``record_stream``/``recorded_streams`` (from a real
  QEMU), ``reader``, ``fill_data``.
- store: repositories: ``ingest``, ``stream_of``, ``synthetic_stream``, ``noise_pages``, ``assert_consistent``,
  ``pack_of``; ``MemoryKeyring`` (a working keyring for their keys).
- s3server: a real S3 server on loopback (SeaweedFS); used by the benchmarks too, so no pytest in it.
- rfb: an RFB client's ``Events``, ``type_text``, ``screendump``, ``assert_matches_screendump``, ``wait_serial``.
- x11: ``Xvfb`` (what the xvfb fixture yields) and ``xlib_display``.
- aio: ``until``, awaiting a condition.
- desktop: the desktop guest's base image (``base``, built once per machine; ``give_base`` to an installation) and
  ``Desktop``, a desktop session driven through its guest agent (the ``desktop`` fixture boots one per run).

ROOT (the checkout) and GUEST_CACHE (where the test guest is built) are here.

Imported as ``helpers`` (``from helpers.cli import Sm``): pytest puts tests/ on sys.path for conftest.py (tests/ is
no package), as the benchmarks do by hand.  tests/s3server.py and tests/qemu_tls.py only re-export for the
benchmarks.  Scripts stay out of this directory (tests/shoot.py): run as a script, a file here would have this
directory on sys.path, where helpers/qemu.py hides the qemu package (qemu.qmp).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
GUEST_CACHE = Path(os.environ.get("SM_TEST_CACHE", ROOT / ".cache")) / "testguest"
