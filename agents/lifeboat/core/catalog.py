"""Recovery-point catalog entry: which log position a bookmark is, per disk."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .errors import IntegrityError

POINT_ENTRY_VERSION = 1
_FIELD_TYPES = {"int": int, "float": (int, float), "str": str, "tuple[str, ...]": tuple}
CONSISTENCY_KINDS = ("app", "crash", "none")


@dataclass(frozen=True)
class PointEntry:
    point_id: str
    machine: str
    disk_id: str
    seq: int            # segment holding the bookmark
    frame_index: int    # bookmark frame's index within that segment
    disk_size: int
    created: float      # unix seconds, agent clock, when the point's data was captured
    consistency: str    # "app" | "crash" | "none" (not consistent: nothing quiesced the disk)
    cycle: int
    block_size: int
    image_digest: str   # xxh3-128 over the ordered per-block digests of the image at the point
    version: int = POINT_ENTRY_VERSION
    # Consistency group (optional, absent in entries written before groups existed): the group
    # point <group, group_tag> exists when every machine in group_members has its entries.
    group: str = ""
    group_tag: str = ""
    group_members: tuple[str, ...] = ()

    def to_json(self) -> dict:
        body = asdict(self)
        body["group_members"] = list(self.group_members)
        return body

    @classmethod
    def from_json(cls, name: str, body: dict) -> "PointEntry":
        if body.get("version") != POINT_ENTRY_VERSION:
            raise IntegrityError(name, f"catalog entry version {body.get('version')!r} is not supported")
        optional = {"group": "", "group_tag": "", "group_members": ()}
        try:
            values = {f.name: body[f.name] if f.name not in optional else body.get(f.name, optional[f.name])
                      for f in fields(cls)}
            values["group_members"] = tuple(values["group_members"])
            entry = cls(**values)
        except (KeyError, TypeError) as exc:
            raise IntegrityError(name, f"catalog entry lacks a field: {exc}") from None
        if not isinstance(entry.consistency, str) or entry.consistency not in CONSISTENCY_KINDS:
            raise IntegrityError(name, f"unknown consistency {entry.consistency!r}")
        # Every field has its declared type (an int may stand for a float, a bool for neither), so a
        # malformed entry fails here with its name, not later in the materializer.
        for f in fields(cls):
            value, want = getattr(entry, f.name), _FIELD_TYPES.get(f.type, str)
            if not isinstance(value, want) or isinstance(value, bool):
                raise IntegrityError(name, f"catalog entry field {f.name!r} is {type(value).__name__}, not {f.type}")
        if not isinstance(body.get("group_members", []), list):
            raise IntegrityError(name, "catalog entry field 'group_members' is not a list")
        if not (isinstance(entry.group, str) and isinstance(entry.group_tag, str)
                and all(isinstance(m, str) for m in entry.group_members)):
            raise IntegrityError(name, "catalog entry has malformed group fields")
        return entry


def point_object_name(disk_id: str, point_id: str) -> str:
    return f"points/{disk_id}/{point_id}"
