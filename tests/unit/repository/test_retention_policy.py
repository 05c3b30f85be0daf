"""points_to_keep: the reference thinning, table-driven over windows, app points and groups."""

from __future__ import annotations

import pytest

from lifeboat.core.catalog import PointEntry
from lifeboat.repository.retention import (
    DAY, HOUR, THINNING_TABLE, RetentionPolicy, bucket_seconds, complete_group_times, points_to_keep)

NOW = 1_000 * DAY   # a multiple of every bucket width: bucket edges fall on whole hours before NOW
MIN = 60.0


def entry(pid: str, age: float, consistency: str = "crash", machine: str = "web01", disk: str = "sda",
          group: str = "", tag: str = "", members: tuple[str, ...] = (), seq: int = 1) -> PointEntry:
    return PointEntry(point_id=pid, machine=machine, disk_id=f"{machine}.{disk}", seq=seq, frame_index=0,
                      disk_size=1 << 20, created=NOW - age, consistency=consistency, cycle=0, block_size=4096,
                      image_digest="", group=group, group_tag=tag, group_members=members)


def every(minutes: float, span_hours: float, prefix: str = "p") -> list[PointEntry]:
    """One point every `minutes` over the last `span_hours`, named by age in minutes."""
    n = int(span_hours * 60 / minutes)
    return [entry(f"{prefix}{int(i * minutes)}", i * minutes * MIN) for i in range(n + 1)]


def test_the_bucket_table_mirrors_the_reference():
    assert THINNING_TABLE[0] == (1 * DAY, 1 * HOUR)
    assert [bucket_seconds(w) for w in (0, 2 * HOUR, DAY, DAY + 1, 7 * DAY, 7 * DAY + 1, 15 * DAY, 60 * DAY)] == \
        [HOUR, HOUR, HOUR, 2 * HOUR, 2 * HOUR, 4 * HOUR, 4 * HOUR, 4 * HOUR]


@pytest.mark.parametrize("retention_hours, keep_all_hours, span_hours, expected", [
    # points every 15 min; all of the keep-all window, then one per bucket inside the window
    (24, 2, 30, 9 + 22),          # 0..120 min: 9 points; hours 2..24 back: 22 buckets (newest of each)
    (6, 2, 30, 9 + 4),            # window 6 h: 4 hourly buckets beyond the keep-all window
    (72, 2, 80, 9 + 35),          # window 3 days: 2 h buckets: (72-2)/2 = 35
    (15 * 24, 2, 15 * 24 + 5, 9 + 90),   # 15 days: 4 h buckets: ages (2 h, 4 h] (straddling the edge) + 89 whole
    (2, 2, 30, 9),                # window = keep-all window: nothing beyond it
    (1, 2, 30, 5),                # keep-all capped by the window: 0..60 min
])
def test_thinning_by_window(retention_hours, keep_all_hours, span_hours, expected):
    points = every(15, span_hours)
    policy = RetentionPolicy(retention_hours * HOUR, keep_all_hours * HOUR)
    keep = points_to_keep(points, policy, NOW)
    assert len(keep) == expected, sorted(keep, key=lambda p: int(p[1:]))
    ages = {int(p[1:]) for p in keep}
    assert all(a <= 120 for a in ages if a < keep_all_hours * 60) and max(ages) <= retention_hours * 60
    # every kept point older than the keep-all window is the newest of its bucket
    width = bucket_seconds(policy.retention_seconds)
    for a in ages:
        if a * MIN > min(keep_all_hours, retention_hours) * HOUR:
            created = NOW - a * MIN
            younger = [p for p in points if (p.created // width) == (created // width) and p.created > created
                       and NOW - p.created > policy.keep_all_seconds]
            assert not younger, (a, [p.point_id for p in younger])


def test_a_kept_point_stays_kept_as_time_passes():
    """Buckets are aligned to the epoch, so the next pass does not thin what the last one kept."""
    points = every(10, 30)
    policy = RetentionPolicy(DAY, 2 * HOUR)
    first = points_to_keep(points, policy, NOW)
    later = points_to_keep([p for p in points if p.point_id in first], policy, NOW + 20 * MIN)
    older_than_window = {p.point_id for p in points if p.created < NOW + 20 * MIN - DAY}
    assert first - later <= older_than_window | {p.point_id for p in points if NOW - p.created < 2 * HOUR + 20 * MIN}
    assert later - first == set()


def test_zero_retention_keeps_only_the_latest_point():
    points = every(5, 3)
    assert points_to_keep(points, RetentionPolicy(0, 2 * HOUR), NOW) == {"p0"}


def test_the_newest_point_is_kept_even_beyond_the_window():
    points = [entry("old", 10 * DAY), entry("older", 11 * DAY)]
    assert points_to_keep(points, RetentionPolicy(DAY), NOW) == {"old"}


def test_the_newest_app_point_inside_the_window_is_kept():
    points = every(15, 30)
    points.append(entry("app1", 5 * HOUR + 20 * MIN, "app"))   # not the newest of its hour
    points.append(entry("app-beyond", 40 * HOUR, "app"))       # outside the window: not kept
    keep = points_to_keep(points, RetentionPolicy(DAY), NOW)
    assert "app1" in keep and "app-beyond" not in keep
    plain = points_to_keep([p for p in points if p.point_id != "app1"] + [entry("app1", 5 * HOUR + 20 * MIN)],
                           RetentionPolicy(DAY), NOW)
    assert "app1" not in plain


def test_an_app_point_must_be_app_on_every_disk():
    pts = every(15, 30) + [entry("x", 5 * HOUR + 20 * MIN, "app", disk="sda"),
                           entry("x", 5 * HOUR + 20 * MIN, "crash", disk="sdb")]
    assert "x" not in points_to_keep(pts, RetentionPolicy(DAY), NOW)


def test_multi_disk_points_are_one_point():
    pts = [entry(f"p{i}", i * 20 * MIN, disk=d) for i in range(30) for d in ("sda", "sdb")]
    keep = points_to_keep(pts, RetentionPolicy(6 * HOUR), NOW)
    # ages 0..120 min all; then the youngest point of each hour bucket (ages (120,180], (180,240], ...)
    assert keep == {f"p{i}" for i in range(7)} | {"p7", "p10", "p13", "p16"}


def group_history(machine: str, skew: float, solo_ages=()) -> list[PointEntry]:
    """Group points every 30 min over 20 h (member clocks differ by `skew`), plus solo fallback points."""
    pts = [entry(f"{machine}-g{i}", i * 30 * MIN + skew, machine=machine, group="g1", tag=f"t{i}",
                 members=("db01", "web01")) for i in range(41)]
    pts += [entry(f"{machine}-s{int(a)}", a, machine=machine) for a in solo_ages]
    return pts


def test_group_points_are_kept_or_dropped_together_across_members():
    # web01's clock is 59 s behind db01's, and only db01 has solo points: the same tags must survive.
    web = group_history("web01", 0.0)
    db = group_history("db01", -59.0, solo_ages=[3 * HOUR + 5 * MIN, 7 * HOUR + 1, 9 * HOUR + 50 * MIN])
    times = complete_group_times(web + db)
    assert len(times) == 41
    policy = RetentionPolicy(DAY)

    def tags(machine_points, keep):
        return {e.group_tag for e in machine_points if e.point_id in keep and e.group_tag}

    keep_web, keep_db = points_to_keep(web, policy, NOW, times), points_to_keep(db, policy, NOW, times)
    assert tags(web, keep_web) == tags(db, keep_db)
    assert 5 + 17 <= len(tags(web, keep_web)) <= 5 + 19
    # solo points form their own stream: the newest solo point is kept, thinned independently
    assert "db01-s3900" in keep_db or "db01-s11100" in keep_db


def test_an_incomplete_group_tag_is_kept_only_while_it_may_still_be_uploading():
    web = group_history("web01", 0.0)
    db = group_history("db01", 0.0)
    lonely_old = entry("web01-lonely-old", 5 * HOUR, machine="web01", group="g1", tag="x1", members=("db01", "web01"))
    lonely_new = entry("web01-lonely-new", 10 * MIN, machine="web01", group="g1", tag="x2", members=("db01", "web01"))
    web += [lonely_old, lonely_new]
    times = complete_group_times(web + db)
    assert ("g1", "x1") not in times and ("g1", "x2") not in times
    keep = points_to_keep(web, RetentionPolicy(DAY), NOW, times)
    assert "web01-lonely-new" in keep and "web01-lonely-old" not in keep


def test_a_member_missing_a_disk_makes_the_tag_incomplete():
    both = [entry("a1", 0, machine="web01", disk=d, group="g", tag="t1", members=("db01", "web01")) for d in ("sda", "sdb")]
    other = [entry("b1", 0, machine="db01", group="g", tag="t1", members=("db01", "web01"))]
    assert ("g", "t1") in complete_group_times(both + other)
    earlier_two_disks = [entry("a0", HOUR, machine="web01", disk=d) for d in ("sda", "sdb")]
    assert ("g", "t1") not in complete_group_times(both[:1] + other + earlier_two_disks)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "24"])
def test_a_bad_policy_is_refused_with_its_name(bad):
    with pytest.raises(ValueError, match="retention_seconds"):
        RetentionPolicy(retention_seconds=bad)
