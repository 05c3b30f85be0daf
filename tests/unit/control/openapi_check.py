"""A small checker of JSON values against the OpenAPI document's schemas (type, required, items, $ref, enum)."""

from __future__ import annotations

import json
import re
from importlib import resources

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def load() -> dict:
    return json.loads(resources.files("lifeboat.control").joinpath("openapi.json").read_text())


def documented_operations(doc: dict) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}


def router_operations(app) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        if route.method != "HEAD" and route.resource is not None:
            out.add((route.resource.canonical, route.method))
    return out


def resolve(doc: dict, schema: dict) -> dict:
    while "$ref" in schema:
        node = doc
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _is(value, tp: str) -> bool:
    if tp == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if tp == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[tp])


def check(doc: dict, schema: dict, value, where: str = "$") -> list[str]:
    """Problems of `value` against `schema` (empty: it conforms)."""
    schema = resolve(doc, schema)
    problems = []
    types = schema.get("type")
    if types:
        types = types if isinstance(types, list) else [types]
        if not any(_is(value, t) for t in types):
            return [f"{where}: {type(value).__name__} is not {'/'.join(types)}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} not in {schema['enum']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        problems.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                problems.append(f"{where}: required field {name!r} missing")
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                problems += check(doc, sub, value[name], f"{where}.{name}")
        if isinstance(schema.get("additionalProperties"), dict):
            for name, v in value.items():
                if name not in schema.get("properties", {}):
                    problems += check(doc, schema["additionalProperties"], v, f"{where}.{name}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            problems += check(doc, schema["items"], v, f"{where}[{i}]")
    return problems


def response_schema(doc: dict, path: str, method: str, status: int) -> dict:
    responses = doc["paths"][path][method.lower()]["responses"]
    resp = resolve(doc, responses.get(str(status)) or responses["default"])
    return resp["content"]["application/json"]["schema"]
