"""Group failover through the management API: a member alone is refused with the way out; the group recovers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lab import Lab
from test_integration_cli_group import GROUP, dep  # noqa: F401 - the repository with group points

DISKS = {"db01": ["sda"], "web01": ["sda", "sdb"]}


def test_group_failover_through_the_api(dep, tmp_path):  # noqa: F811
    lab = Lab(tmp_path / "lab", control=True)
    try:
        lab.init["repository"], lab.init["key_file"] = dep.init["repository"], dep.init["key_file"]
        lab.start_ps()
        assert lab.api_cli("group", "create", GROUP).returncode == 0
        for machine, disks in DISKS.items():
            args = [a for d in disks for a in ("--disk", d)]
            assert lab.api_cli("protect", machine, *args, "--group", GROUP).returncode == 0

        alone = lab.api_cli("failover", "--test", "db01", "--point", "latest", "--to", str(tmp_path / "alone"))
        assert alone.returncode != 0 and "consistency group shop" in alone.stderr
        assert f"--group {GROUP} --point latest-group" in alone.stderr and not (tmp_path / "alone").exists()

        partial = lab.api_cli("failover", "--test", "--group", GROUP, "--point", "g2", "--to", str(tmp_path / "dr"))
        assert partial.returncode != 0 and "web01 lack it" in partial.stderr

        target = tmp_path / "dr"
        res = lab.api_cli("failover", "--test", "--group", GROUP, "--point", "latest-group", "--to", str(target))
        assert res.returncode == 0, res.stderr
        rows = [json.loads(line) for line in res.stdout.splitlines()]
        assert sorted(r["disk_id"] for r in rows) == ["db01.sda", "web01.sda", "web01.sdb"]
        for r in rows:
            assert r["point_id"] == f"{r['machine']}-g3" and r["test"] is True
            assert Path(r["path"]).read_bytes() == dep.expected[(r["point_id"], r["disk_id"])]
        for machine in DISKS:
            assert lab.api_cli("failover", "cleanup", machine).returncode == 0
        assert all(not os.path.exists(r["path"]) for r in rows)
    finally:
        lab.close()
