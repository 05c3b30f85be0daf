"""Group points from catalog entries (cli/points.py): complete tags only, earliest created, weakest
consistency, resolution of --point for --group."""

from __future__ import annotations

import dataclasses

import pytest

from lifeboat.cli.points import (
    GroupFailoverRefused,
    group_points,
    machine_points,
    point_group,
    resolve_group,
)
from lifeboat.core.catalog import PointEntry
from lifeboat.core.errors import LifeboatError, PointIncomplete, PointNotFound

HAS_GROUP_FIELDS = {"group", "group_tag", "group_members"} <= {f.name for f in dataclasses.fields(PointEntry)}
pytestmark = pytest.mark.skipif(not HAS_GROUP_FIELDS, reason="PointEntry has no group fields yet")

DISKS = {"db01": ["sda"], "web01": ["sda", "sdb"], "web02": ["sda"]}
MEMBERS = ("db01", "web01", "web02")


def entry(machine: str, disk: str, point_id: str, created: float, consistency: str = "crash", group: str = "",
          tag: str = "", members: tuple[str, ...] = MEMBERS) -> PointEntry:
    extra = {"group": group, "group_tag": tag, "group_members": members if group else ()}
    return PointEntry(point_id=point_id, machine=machine, disk_id=f"{machine}.{disk}", seq=1, frame_index=0,
                      disk_size=1 << 20, created=created, consistency=consistency, cycle=1, block_size=65536,
                      image_digest="", **extra)


def machine_entries(machine: str, point_id: str, created: float, consistency: str = "crash", group: str = "",
                    tag: str = "", disks: list[str] | None = None, members: tuple[str, ...] = MEMBERS):
    return [entry(machine, d, point_id, created, consistency, group, tag, members)
            for d in (DISKS[machine] if disks is None else disks)]


def group_tag_entries(tag: str, created: float, consistency: dict[str, str] | None = None, group: str = "shop",
                      skip: tuple[str, ...] = ()) -> list[PointEntry]:
    out = []
    for i, m in enumerate(MEMBERS):
        if m not in skip:
            point_id = f"{m}-{tag}" if group == "shop" else f"{m}-{group}-{tag}"
            out += machine_entries(m, point_id, created + i * 0.01, (consistency or {}).get(m, "crash"), group, tag)
    return out


def test_a_complete_tag_is_one_group_point_with_every_member():
    listing = group_points(group_tag_entries("g1", 100.0), "shop")
    assert listing.incomplete == {}
    (gp,) = listing.points
    assert (gp.group, gp.tag, gp.created, gp.consistency) == ("shop", "g1", 100.0, "crash")
    assert {m: p.point_id for m, p in gp.members.items()} == {"db01": "db01-g1", "web01": "web01-g1",
                                                               "web02": "web02-g1"}
    assert list(gp.members) == sorted(MEMBERS)
    assert sorted(gp.members["web01"].disks) == ["web01.sda", "web01.sdb"]


def test_created_is_the_earliest_members_and_consistency_the_weakest():
    entries = (group_tag_entries("g1", 300.0, {"db01": "app", "web01": "app", "web02": "crash"})
               + group_tag_entries("g2", 200.0, {m: "app" for m in MEMBERS})
               + group_tag_entries("g3", 100.0, {"db01": "app", "web01": "none", "web02": "crash"}))
    pts = group_points(entries, "shop").points
    assert [(g.tag, g.created, g.consistency) for g in pts] == [("g3", 100.0, "none"), ("g2", 200.0, "app"),
                                                                ("g1", 300.0, "crash")]


def test_a_tag_some_member_lacks_is_left_out_and_counted():
    entries = group_tag_entries("g1", 100.0) + group_tag_entries("g2", 200.0, skip=("web02",))
    listing = group_points(entries, "shop")
    assert [g.tag for g in listing.points] == ["g1"]
    assert listing.incomplete == {"g2": ["web02"]}


def test_a_member_missing_one_of_its_disks_makes_the_tag_incomplete():
    # web01 replicates two disks (its g1 point has both); at g2 only sda's entry is there yet.
    entries = group_tag_entries("g1", 100.0) + group_tag_entries("g2", 200.0, skip=("web01",))
    entries += machine_entries("web01", "web01-g2", 200.0, group="shop", tag="g2", disks=["sda"])
    listing = group_points(entries, "shop")
    assert [g.tag for g in listing.points] == ["g1"]
    assert listing.incomplete == {"g2": ["web01"]}


def test_disks_that_disagree_on_the_tag_do_not_make_a_member_point():
    entries = group_tag_entries("g1", 100.0, skip=("web01",))
    entries += [entry("web01", "sda", "web01-x", 100.0, group="shop", tag="g1"),
                entry("web01", "sdb", "web01-x", 100.0, group="shop", tag="g9")]
    listing = group_points(entries, "shop")
    assert listing.points == []
    assert listing.incomplete["g1"] == ["web01"]


def test_other_groups_and_plain_points_are_ignored():
    entries = (group_tag_entries("g1", 100.0) + group_tag_entries("g1", 50.0, group="other")
               + machine_entries("db01", "db01-plain", 10.0) + machine_entries("web01", "web01-plain", 20.0))
    shop = group_points(entries, "shop")
    assert [(g.group, g.tag, g.created) for g in shop.points] == [("shop", "g1", 100.0)]
    assert shop.incomplete == {}
    assert [g.created for g in group_points(entries, "other").points] == [50.0]
    assert group_points(entries, "nosuch").points == []


def test_entries_without_a_member_list_prove_nothing():
    entries = [e for m in MEMBERS for e in machine_entries(m, f"{m}-g1", 100.0, group="shop", tag="g1", members=())]
    listing = group_points(entries, "shop")
    assert listing.points == [] and list(listing.incomplete) == ["g1"]


def test_members_are_taken_from_the_entries_not_from_who_showed_up():
    # Only db01 and web01 have points, but the entries say the group has three members.
    entries = group_tag_entries("g1", 100.0, skip=("web02",))
    assert group_points(entries, "shop").incomplete == {"g1": ["web02"]}
    # A two-member group at that tag is complete with two.
    two = ("db01", "web01")
    entries = [e for m in two for e in machine_entries(m, f"{m}-g1", 100.0, group="shop", tag="g1", members=two)]
    (gp,) = group_points(entries, "shop").points
    assert list(gp.members) == ["db01", "web01"]


def test_point_group_of_machine_points():
    entries = machine_entries("db01", "p1", 1.0) + machine_entries("db01", "p2", 2.0, group="shop", tag="g1")
    by_id = {p.point_id: p for p in machine_points(entries)}
    assert point_group(by_id["p1"]) == "" and point_group(by_id["p2"]) == "shop"


def test_resolve_group_choices():
    entries = (group_tag_entries("g1", 100.0, {m: "app" for m in MEMBERS}) + group_tag_entries("g2", 200.0)
               + group_tag_entries("g3", 300.0, skip=("db01",)))
    listing = group_points(entries, "shop")
    assert resolve_group(listing, "shop", "latest-group").tag == "g2"
    assert resolve_group(listing, "shop", "latest").tag == "g2"
    assert resolve_group(listing, "shop", "latest-crash").tag == "g2"
    assert resolve_group(listing, "shop", "latest-app").tag == "g1"
    assert resolve_group(listing, "shop", "g1").tag == "g1"
    with pytest.raises(PointIncomplete, match="db01 lack it"):
        resolve_group(listing, "shop", "g3")
    with pytest.raises(PointNotFound):
        resolve_group(listing, "shop", "g4")
    with pytest.raises(PointNotFound, match="latest-group of group none"):
        resolve_group(group_points(entries, "none"), "none", "latest-group")


def test_the_refusal_message_is_printed_as_is():
    msg = "machine db01 is in consistency group shop: fail over the whole group with --group shop"
    exc = GroupFailoverRefused(msg)
    assert str(exc) == msg and isinstance(exc, LifeboatError) and exc.exit_code != 0
