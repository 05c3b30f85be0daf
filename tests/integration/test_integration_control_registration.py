"""Registration and revocation through the `lifeboat` CLI against a real process server with the control role."""

from __future__ import annotations

import json
import os
import stat

from lifeboat.control.store import bundled_migrations


def test_init_register_revoke_through_the_cli(control_lab, tmp_path):
    lab = control_lab
    for key in ("registration_passphrase", "operator_credential"):
        assert stat.S_IMODE(os.stat(lab.init[key]).st_mode) == 0o600
    lab.start_ps()
    cred = tmp_path / "web01.credential"
    reg = lab.api_cli("register", "--passphrase-file", lab.init["registration_passphrase"], "--machine", "web01",
                      "--out", str(cred), check=True)
    registered = json.loads(reg.stdout)
    assert registered["principal"] == "agent:web01" and stat.S_IMODE(os.stat(cred).st_mode) == 0o600

    again = lab.api_cli("register", "--passphrase-file", lab.init["registration_passphrase"], "--machine", "web01",
                        "--out", str(tmp_path / "again.credential"))
    assert again.returncode != 0 and "already registered" in again.stderr and "HTTP 409" in again.stderr
    assert not (tmp_path / "again.credential").exists()

    # The agent's credential does not open operator calls; the refusal is plain and non-zero.
    forbidden = lab.api_cli("credentials", "list", credential=str(cred))
    assert forbidden.returncode != 0 and "agent:web01 may not" in forbidden.stderr

    listed = json.loads(lab.api_cli("credentials", "list", "--json", check=True).stdout)
    assert {f"{c['kind']}:{c['name']}" for c in listed} == {"operator:admin", "agent:web01"}
    lab.api_cli("credentials", "revoke", registered["credential_id"], "--reason", "test", check=True)
    revoked = lab.api_cli("credentials", "list", credential=str(cred))
    assert revoked.returncode != 0 and "was revoked" in revoked.stderr and "HTTP 401" in revoked.stderr

    # State survives a restart of the process server (SQLite, migrations not re-applied).
    assert lab.stop_ps() == 0
    lab.start_ps()
    listed = json.loads(lab.api_cli("credentials", "list", "--json", check=True).stdout)
    assert [c["revoked_reason"] for c in listed if c["name"] == "web01"] == ["test"]
    log = lab.log_path.read_text()
    assert "api call refused" in log and "reason='revoked'" in log and "reason='forbidden'" in log
    assert log.count("schema migrated") == len(bundled_migrations())   # each applied once, on the first start
