"""Registration, authentication, revocation and refusals of the management API, over real TLS."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from lifeboat.control.client import ApiCallFailed


async def register(control, name: str, kind: str = "agent", passphrase: str | None = None, **extra) -> dict:
    async with control.client() as api:
        return await api.call("POST", "/register", {"passphrase": passphrase or control.passphrase, "kind": kind,
                                                    "name": name, **extra})


async def test_agent_registers_once_and_its_credential_names_its_machine(control):
    reply = await register(control, "web01")
    assert reply["principal"] == "agent:web01" and reply["token"].startswith("lbt_")
    async with control.client(reply["token"]) as api:
        me = await api.call("GET", "/whoami")
    assert me == {"kind": "agent", "name": "web01", "credential_id": reply["credential_id"], "principal": "agent:web01"}
    with pytest.raises(ApiCallFailed) as again:
        await register(control, "web01")
    assert again.value.status == 409 and again.value.code == "already_registered"
    assert reply["credential_id"] in again.value.message and "credentials revoke" in again.value.message
    # Tokens are stored only as hashes.
    rows = await control.role.store.call(lambda c: [tuple(r) for r in c.execute("SELECT * FROM credentials")])
    assert not any(reply["token"] in str(v) for row in rows for v in row)


async def test_wrong_passphrase_is_refused_counted_and_logged(control):
    with capture_logs() as logs:
        with pytest.raises(ApiCallFailed) as exc:
            await register(control, "web01", passphrase="not-the-passphrase-at-all")
    assert exc.value.status == 403 and exc.value.code == "bad_passphrase"
    assert "lifeboat init" in exc.value.message
    assert control.refusals("bad_passphrase") == 1
    assert any(e["event"] == "api call refused" and e["reason"] == "bad_passphrase" for e in logs)


async def test_no_credential_is_refused_counted_and_logged(control):
    with capture_logs() as logs:
        with pytest.raises(ApiCallFailed) as exc:
            async with control.client() as api:
                await api.call("GET", "/whoami")
    assert exc.value.status == 401 and exc.value.code == "unauthenticated"
    assert "Authorization: Bearer" in exc.value.message
    assert control.refusals("unauthenticated") == 1
    refused = [e for e in logs if e["event"] == "api call refused"]
    assert refused and refused[0]["path"] == "/api/v1/whoami" and refused[0]["status"] == 401


async def test_foreign_credential_is_refused(control):
    with pytest.raises(ApiCallFailed) as exc:
        async with control.client("lbt_" + "x" * 43) as api:   # well-formed, but not issued here
            await api.call("GET", "/whoami")
    assert exc.value.status == 401 and exc.value.code == "unknown_credential"
    assert control.refusals("unknown_credential") == 1


async def test_revoked_credential_is_refused_and_the_machine_may_register_again(control):
    reply = await register(control, "web01")
    async with control.operator() as op:
        revoked = await op.call("POST", f"/credentials/{reply['credential_id']}/revoke", {"reason": "rebuilt"})
        assert revoked["revoked"] is not None and revoked["revoked_reason"] == "rebuilt"
        listed = (await op.call("GET", "/credentials"))["credentials"]
    assert {c["id"]: c["revoked_reason"] for c in listed}[reply["credential_id"]] == "rebuilt"
    assert all("token" not in c for c in listed)
    with capture_logs() as logs:
        with pytest.raises(ApiCallFailed) as exc:
            async with control.client(reply["token"]) as api:
                await api.call("GET", "/whoami")
    assert exc.value.status == 401 and exc.value.code == "revoked" and "register again" in exc.value.message
    assert control.refusals("revoked") == 1
    assert any(e["event"] == "api call refused" and e["reason"] == "revoked" for e in logs)
    fresh = await register(control, "web01")   # revocation frees the principal for a new registration
    assert fresh["credential_id"] != reply["credential_id"]


async def test_expired_credential_is_refused(control):
    async with control.operator() as op:
        issued = await op.call("POST", "/credentials", {"kind": "agent", "name": "web02", "ttl_seconds": 3600})
    await control.role.store.call(lambda c: c.execute("UPDATE credentials SET expires = 1 WHERE id = ?",
                                                      (issued["credential_id"],)))
    with pytest.raises(ApiCallFailed) as exc:
        async with control.client(issued["token"]) as api:
            await api.call("GET", "/whoami")
    assert exc.value.status == 401 and exc.value.code == "expired" and "1970-01-01" in exc.value.message


async def test_agent_cannot_use_operator_calls(control):
    reply = await register(control, "web01")
    with pytest.raises(ApiCallFailed) as exc:
        async with control.client(reply["token"]) as api:
            await api.call("GET", "/credentials")
    assert exc.value.status == 403 and exc.value.code == "forbidden" and "agent:web01" in exc.value.message
    assert control.refusals("forbidden") == 1


async def test_revoked_operator_credential_stays_revoked_after_a_restart(control):
    async with control.operator() as op:
        me = await op.call("GET", "/whoami")
        await op.call("POST", f"/credentials/{me['credential_id']}/revoke", {})
    await control.stop()
    await control.start()   # bootstrap reads operator.credential again
    with pytest.raises(ApiCallFailed) as exc:
        async with control.operator() as op:
            await op.call("GET", "/whoami")
    assert exc.value.code == "revoked"


@pytest.mark.parametrize("body, what", [
    ({"kind": "agent", "name": "web01"}, "'passphrase' is required"),
    ({"passphrase": "p", "kind": "operator", "name": "x"}, "cannot register"),
    ({"passphrase": "p", "kind": "agent", "name": "Web.01"}, "must match"),
    ({"passphrase": "p", "kind": "process-server", "name": "ps2"}, "ingest 'url'"),
    ({"passphrase": 5, "kind": "agent", "name": "a"}, "must be a str"),
])
async def test_bad_registration_requests_get_400_naming_the_field(control, body, what):
    with pytest.raises(ApiCallFailed) as exc:
        async with control.client() as api:
            await api.call("POST", "/register", body)
    assert exc.value.status == 400 and what in exc.value.message


async def test_oversized_and_non_json_bodies_are_refused(control):
    async with control.client() as api:
        async with api.session.post(control.url + "/api/v1/register", data=b"x" * (128 * 1024)) as resp:
            assert resp.status == 413 and (await resp.json())["error"] == "too_large"
        async with api.session.post(control.url + "/api/v1/register", data=b"{not json") as resp:
            assert resp.status == 400 and "not JSON" in (await resp.json())["message"]
        async with api.session.get(control.url + "/api/v1/nothing-here") as resp:
            assert resp.status == 404 and (await resp.json())["error"] == "not_found"


async def test_rotated_passphrase_replaces_the_old_one(control):
    async with control.operator() as op:
        new = (await op.call("POST", "/registration/passphrase", {}))["passphrase"]
    with pytest.raises(ApiCallFailed) as exc:
        await register(control, "web01")          # the passphrase from init no longer works
    assert exc.value.code == "bad_passphrase"
    assert (await register(control, "web01", passphrase=new))["principal"] == "agent:web01"


async def test_without_a_passphrase_registration_says_how_to_set_one(tmp_path):
    from control_helpers import RunningControl

    rc = RunningControl(tmp_path, registration_passphrase_file="")
    await rc.start()
    try:
        with pytest.raises(ApiCallFailed) as exc:
            await register(rc, "web01")
        assert exc.value.status == 403 and "control.registration_passphrase_file" in exc.value.message
    finally:
        await rc.stop()


async def test_a_scale_out_cannot_take_the_primarys_name(control):
    with pytest.raises(ApiCallFailed) as exc:
        await register(control, "primary", kind="process-server", url="https://127.0.0.1:1")
    assert exc.value.status == 409 and "primary process server's name" in exc.value.message
    reply = await register(control, "ps2", kind="process-server", url="https://127.0.0.1:9444")
    async with control.operator() as op:
        servers = (await op.call("GET", "/process-servers"))["process_servers"]
    assert [(s["name"], s["primary"]) for s in servers] == [("primary", True), ("ps2", False)]
    async with control.client(reply["token"]) as ps2:
        agent = await register(control, "web01")
        assert (await ps2.call("POST", "/credentials/check", {"token": agent["token"]}))["name"] == "web01"
        bad = await ps2.call("POST", "/credentials/check", {"token": "lbt_nope"})
        assert bad["valid"] is False and bad["reason"] == "unknown_credential"
