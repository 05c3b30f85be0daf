"""`lifeboat retention apply|commit` on a local repository: JSON report, bit-exact points, clear errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from pathlib import Path

import pytest

from lifeboat.cli.main import main
from lifeboat.core import keys
from lifeboat.repository.local import LocalBackend
from lifeboat.repository.repo import Repository

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "demo"))
from synthetic_log import SyntheticDisk  # noqa: E402

NOW = 2_000_000_000.0


@pytest.fixture
def deployment(tmp_path):
    """A repository with 6 points of web01, 90 minutes apart; returns (repo args, {point: sha256})."""
    key_path = str(tmp_path / "key")

    async def build():
        backend = LocalBackend(str(tmp_path / "repo"))
        repo = await Repository.init(backend, keys.write_key_file(key_path))
        disk = SyntheticDisk(repo, "web01", "sda", 1 << 20)
        expected = {}
        for i in range(6):
            expected[f"p{i}"] = await disk.segment(disk.random_writes(4), f"p{i}", NOW - (5 - i) * 5400)
        await backend.close()
        return expected

    expected = asyncio.run(build())
    return ["--repo", f"local:{tmp_path / 'repo'}", "--key-file", key_path], expected


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_apply_prints_the_report_and_every_kept_point_fails_over(deployment, capsys, tmp_path):
    repo, expected = deployment
    code, out, _ = run(capsys, "retention", "apply", *repo, "--machine", "web01", "--retention-hours", "4",
                       "--now", str(NOW), "--json")
    assert code == 0
    report = json.loads(out)
    # ages 0, 1.5, 3, 4.5, 6, 7.5 h; window 4 h, keep-all 2 h: 0 and 1.5 h, then the hour bucket of 3 h
    assert report["kept_points"] == ["p3", "p4", "p5"] and report["dropped_points"] == ["p0", "p1", "p2"]
    assert report["bytes_after"] < report["bytes_before"] and report["segments_deleted"] == 3
    for pid in report["kept_points"]:
        target = tmp_path / f"{pid}.img"
        code, _, err = run(capsys, "failover", *repo, "--test", "--point", pid, "--to", str(target), "-q")
        assert code == 0, err
        assert hashlib.sha256(target.read_bytes()).hexdigest() == expected[pid]
    code, out, _ = run(capsys, "retention", "commit", *repo, "--machine", "web01", "--point", "p4")
    assert code == 0 and "kept 1 points, dropped 2" in out and "dropped p3" in out
    code, out, _ = run(capsys, "verify", *repo, "-q")
    assert code == 0, out


@pytest.mark.parametrize("args, message, exit_code", [
    (["--retention-hours", "abc"], "'abc' is not a number of hours", 2),
    (["--retention-hours", "-1"], "finite number >= 0", 2),
    (["--retention-hours", "nan"], "finite number >= 0", 2),
    (["--retention-hours", "24", "--checkpoint-every", "-3"], "--checkpoint-every -3", 2),
    (["--retention-hours", "24", "--machine", "nosuch"], "No recovery point matches 'any point of machine nosuch'", 3),
])
def test_bad_input_gets_a_clear_error_and_changes_nothing(deployment, capsys, tmp_path, args, message, exit_code):
    repo, _ = deployment
    before = sorted(p.name for p in (tmp_path / "repo").rglob("*"))
    machine = [] if "--machine" in args else ["--machine", "web01"]
    code, _, err = run(capsys, "retention", "apply", *repo, *machine, *args)
    assert code == exit_code and message in err, err
    assert sorted(p.name for p in (tmp_path / "repo").rglob("*")) == before


def test_commit_to_an_unknown_point_is_refused(deployment, capsys):
    repo, _ = deployment
    code, _, err = run(capsys, "retention", "commit", *repo, "--machine", "web01", "--point", "nope")
    assert code == 3 and "nope of machine web01" in err
