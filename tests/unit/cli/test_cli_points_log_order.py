"""A machine's points are ordered by log position, not by the agent's wall clock (which can jump)."""

from __future__ import annotations

from lifeboat.cli.points import machine_points, resolve
from lifeboat.core.catalog import PointEntry


def entry(machine: str, disk: str, point_id: str, created: float, seq: int, frame_index: int = 0) -> PointEntry:
    return PointEntry(point_id=point_id, machine=machine, disk_id=f"{machine}.{disk}", seq=seq,
                      frame_index=frame_index, disk_size=1 << 20, created=created, consistency="crash", cycle=1,
                      block_size=65536, image_digest="")


def test_a_clock_that_jumped_forward_does_not_make_an_old_point_latest():
    # Cycle 1 ran with the clock 7 h ahead; cycles 2 and 3 after NTP stepped it back.
    jump = 7 * 3600
    entries = [entry("web01", "sda", "p1", 1000.0 + jump, seq=3),
               entry("web01", "sda", "p2", 1010.0, seq=5),
               entry("web01", "sda", "p3", 1020.0, seq=5, frame_index=2)]
    points = machine_points(entries)
    assert [p.point_id for p in points] == ["p1", "p2", "p3"]
    assert resolve(points, "latest", None).point_id == "p3"


def test_every_disk_of_the_machine_agrees_and_other_machines_keep_their_wall_time_slots():
    entries = [entry("web01", d, "w-new", 500.0, seq=9) for d in ("sda", "sdb")]
    entries += [entry("web01", d, "w-old", 900.0, seq=4) for d in ("sda", "sdb")]
    entries += [entry("db01", "sda", "d1", 700.0, seq=1)]
    points = machine_points(entries)
    assert [p.point_id for p in points] == ["w-old", "d1", "w-new"]
    assert resolve(points, "latest", "web01").point_id == "w-new"
