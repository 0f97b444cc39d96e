"""What a checkpoint is to the rest of the program: its meta record and its listing entry.

The store keeps ``meta`` as the writer gives it and interprets only ``kind`` (retention.py); the engine writes it
and the CLI, the app, a receiving peer and ``resume`` read it (docs/design.md has the schema).  A manifest comes
from disk or another machine, so every field is type-checked here and a wrong one makes the manifest damaged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class CheckpointMeta:
    kind: str | None = None  # "manual", "autosave", ... (the engine's); retention thins by it
    note: str = ""  # the note given when it was taken (an annotation may change it later)
    live: bool | None = None  # the guest ran while its memory was copied (else it was paused for the copy)
    pause_ms: float | None = None  # how long the guest was stopped
    downtime_ms: float | None = None  # QEMU's own account of it
    wall_s: float | None = None  # how long taking it took
    stream_bytes: int | None = None  # the migration stream's size
    disk_layer: str | None = None  # the frozen overlay file holding its disk, while that file still exists
    qemu: str | None = None  # the version of the QEMU that ran it ("7.2.0")
    config: dict[str, Any] | None = None  # the session's config.toml as it was (a resume builds the session from it)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they were

    _TYPES = {"kind": (str,), "note": (str,), "live": (bool,), "pause_ms": (int, float), "downtime_ms": (int, float),
              "wall_s": (int, float), "stream_bytes": (int,), "disk_layer": (str,), "qemu": (str,), "config": (dict,)}

    @classmethod
    def from_json(cls, data: Any) -> CheckpointMeta:
        """The record from a manifest's ``meta``; ValueError if it is not an object or a field has the wrong type."""
        if not isinstance(data, dict):
            raise ValueError("meta is not an object")
        known: dict[str, Any] = {}
        for name, value in data.items():
            if name in cls._TYPES and value is not None:
                types = cls._TYPES[name]
                if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                    raise ValueError(f"meta {name} has the wrong type")
                known[name] = value
        return cls(**known, extra={k: v for k, v in data.items() if k not in cls._TYPES})

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **{k: v for k, v in out.items() if v is not None}}


@dataclass
class CheckpointInfo:
    id: str
    session: str
    parent: str | None
    created: str  # ISO 8601, UTC
    meta: CheckpointMeta  # what the writer recorded
    annotation: dict[str, Any]  # the latest annotation: "note", "pinned" (and "damaged_annotation" when unreadable)
    added_bytes: int
    stream_bytes: int
    disk_size: int | None
    manifest: dict[str, Any] = field(repr=False)

    @classmethod
    def from_manifest(cls, m: dict[str, Any], annotation: dict[str, Any]) -> CheckpointInfo:
        """From a manifest whose list of segments may have been left out; ValueError, KeyError or TypeError if it
        is malformed."""
        datetime.fromisoformat(m["created"])  # a time that does not parse makes the manifest damaged, not the listing
        if m["memory"] and "segments" in m["memory"]:
            memory = {k: v for k, v in m["memory"].items() if k != "segments"}
            m = {**m, "memory": {**memory, "segment_count": len(m["memory"]["segments"])}}
        return cls(id=m["id"], session=m["session"], parent=m["parent"], created=m["created"],
                   meta=CheckpointMeta.from_json(m["meta"]), annotation=annotation, added_bytes=m["added_bytes"],
                   stream_bytes=(m["memory"] or {}).get("stream_bytes", 0), disk_size=(m["disk"] or {}).get("size"),
                   manifest=m)

    @property
    def note(self) -> str:
        return str(self.annotation.get("note", self.meta.note) or "")

    @property
    def pinned(self) -> bool:
        return bool(self.annotation.get("pinned"))

    @property
    def created_at(self) -> datetime:
        return datetime.fromisoformat(self.created)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "session": self.session, "parent": self.parent, "created": self.created,
                "note": self.note, "pinned": self.pinned, "added_bytes": self.added_bytes,
                "stream_bytes": self.stream_bytes, "disk_size": self.disk_size,
                "meta": {**self.meta.to_json(), **self.annotation}}
