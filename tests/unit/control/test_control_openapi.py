"""The shipped OpenAPI document matches the running server: same routes, and answers carry the documented fields."""

from __future__ import annotations

import pytest

from lifeboat.control.client import ApiCallFailed
from openapi_check import check, documented_operations, load, response_schema, router_operations


async def test_every_documented_operation_is_served_and_vice_versa(control):
    doc = load()
    served = router_operations(control.role.runner.app)
    documented = documented_operations(doc)
    assert served - documented == set(), "served but not documented"
    assert documented - served == set(), "documented but not served"


async def test_every_operation_documents_its_errors_and_security():
    doc = load()
    public = {("/api/v1/version", "get"), ("/api/v1/register", "get"), ("/api/v1/register", "post")}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op.get("summary"), (path, method)
            if (path, method) not in public:
                assert "401" in op["responses"], f"{method} {path} must document 401"
            for param in op.get("parameters", []):
                name = param.get("name") or param["$ref"].rsplit("/", 1)[1]
                assert "{" + name + "}" in path, (path, name)


async def call_and_check(doc, api, method: str, path: str, template: str, status: int, body=None) -> dict:
    try:
        answer = await api.call(method, path, body)
        got = 201 if method == "POST" and "token" in answer else 200
    except ApiCallFailed as exc:
        answer, got = exc.body, exc.status
    assert got == status, (method, path, answer)
    problems = check(doc, response_schema(doc, template, method, status), answer)
    assert problems == [], (method, path, problems)
    return answer


async def test_answers_carry_the_documented_fields(control):
    doc = load()
    async with control.client() as anon:
        await call_and_check(doc, anon, "GET", "/version", "/api/v1/version", 200)
        reg = await call_and_check(doc, anon, "POST", "/register", "/api/v1/register", 201,
                                   {"passphrase": control.passphrase, "kind": "agent", "name": "web01"})
        await call_and_check(doc, anon, "POST", "/register", "/api/v1/register", 409,
                             {"passphrase": control.passphrase, "kind": "agent", "name": "web01"})
        await call_and_check(doc, anon, "GET", "/whoami", "/api/v1/whoami", 401)
    async with control.operator() as op:
        await call_and_check(doc, op, "GET", "/whoami", "/api/v1/whoami", 200)
        await call_and_check(doc, op, "GET", "/credentials", "/api/v1/credentials", 200)
        await call_and_check(doc, op, "POST", f"/credentials/{reg['credential_id']}/revoke",
                             "/api/v1/credentials/{credential_id}/revoke", 200, {})
        await call_and_check(doc, op, "POST", "/credentials/c-none/revoke",
                             "/api/v1/credentials/{credential_id}/revoke", 404, {})
        await call_and_check(doc, op, "POST", "/credentials/check", "/api/v1/credentials/check", 200,
                             {"token": reg["token"]})


def test_the_checker_finds_missing_fields_and_wrong_types():
    doc = load()
    schema = {"$ref": "#/components/schemas/Credential"}
    assert check(doc, schema, {"id": "c", "kind": "agent"})  # required fields missing
    assert check(doc, schema, {"id": 1, "kind": "agent", "name": "n", "created": 1.0, "expires": None,
                               "revoked": None, "revoked_reason": None}) == ["$.id: int is not string"]


def test_every_reference_in_the_document_resolves():
    from openapi_check import resolve

    doc = load()
    refs = []

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert len(refs) > 50
    for ref in set(refs):
        assert resolve(doc, {"$ref": ref}), ref
    assert doc["openapi"].startswith("3.")
