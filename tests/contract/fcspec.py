"""Firecracker's published API (OpenAPI 2.0 / swagger) as a request validator.

The spec lives outside the repository, in ``../shared/specs/firecracker-api.yaml``,
and is read only when present: :func:`spec_path_or_skip` (and :meth:`FirecrackerSpec.load`
with no path) skips the test, or the whole module when called at import, naming the
path it looked at.
Bodies are checked with :mod:`jsonschema` (draft 4, the dialect swagger 2.0
schemas are written in) against the operation's ``in: body`` parameter, with
the spec's ``definitions`` attached so ``#/definitions/...`` references
resolve.

Two deliberate tightenings, both matching what Firecracker itself enforces:

* objects refuse properties the spec does not list (Firecracker's API types
  are deserialised with serde's ``deny_unknown_fields``, so a misspelt key is
  a 400, not a silently ignored field);
* a few rules the spec states only in prose: a drive's or NIC's id in the
  body must equal the id in the path, and a snapshot load names exactly one
  of ``mem_file_path`` and ``mem_backend``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SPEC_PATH = REPO.parent / "shared" / "specs" / "firecracker-api.yaml"

HTTP_METHODS = ("get", "put", "patch", "post", "delete")


def missing_spec_reason(path: Path = SPEC_PATH) -> str | None:
    """Why the contract tests cannot run (the spec file is absent), or None."""
    if path.is_file():
        return None
    return (f"Firecracker API spec not found at {path} "
            "(the shared/ checkout beside the repository is absent)")


def spec_path_or_skip() -> Path:
    """The spec's path; skips the calling test (or module, at import) when it is absent."""
    reason = missing_spec_reason()
    if reason is not None:
        pytest.skip(reason, allow_module_level=True)
    return SPEC_PATH


def _close_objects(schema: Any) -> None:
    """Add ``additionalProperties: false`` to every object schema listing properties."""
    if not isinstance(schema, dict):
        return
    props = schema.get("properties")
    if isinstance(props, dict):
        for sub in props.values():
            _close_objects(sub)
        schema.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties"):
        _close_objects(schema.get(key))
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key, []):
            _close_objects(sub)


@dataclass(frozen=True)
class Route:
    """One operation of the spec, matched against a concrete request path."""

    method: str
    template: str
    params: dict[str, str]
    operation: dict[str, Any]


class FirecrackerSpec:
    """Routes and schemas of the Firecracker API."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.version = str(doc.get("info", {}).get("version", "?"))
        self.definitions = copy.deepcopy(doc["definitions"])
        for definition in self.definitions.values():
            _close_objects(definition)
        self._routes: list[tuple[str, re.Pattern[str], dict[str, Any]]] = []
        for template, item in doc["paths"].items():
            regex = re.compile(
                "^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$")
            self._routes.append((template, regex, item))

    @classmethod
    def load(cls, path: Path | None = None) -> FirecrackerSpec:
        """The spec at ``path``; without one, the shared spec or a skip (see module doc)."""
        return cls(yaml.safe_load((path or spec_path_or_skip()).read_text()))

    def operations(self) -> set[tuple[str, str]]:
        """Every (METHOD, template) the spec defines."""
        return {(m.upper(), t) for t, _, item in self._routes for m in item if m in HTTP_METHODS}

    def route(self, method: str, path: str) -> Route | None:
        for template, regex, item in self._routes:
            match = regex.match(path)
            op = item.get(method.lower())
            if match and op is not None:
                return Route(method.upper(), template, match.groupdict(), op)
        return None

    def _validator(self, schema: dict[str, Any]) -> jsonschema.Draft4Validator:
        closed = copy.deepcopy(schema)
        _close_objects(closed)
        return jsonschema.Draft4Validator({**closed, "definitions": self.definitions})

    def _schema_errors(self, schema: dict[str, Any], value: Any, where: str) -> list[str]:
        errors = []
        for err in sorted(self._validator(schema).iter_errors(value), key=str):
            loc = "/".join(str(p) for p in err.absolute_path) or "(root)"
            errors.append(f"{where} {loc}: {err.message}")
        return errors

    def validate_request(self, method: str, path: str, body: Any,
                         content_type: str | None = None) -> tuple[Route | None, list[str]]:
        """Check a request; returns its route (None if unknown) and every problem found.

        Args:
            method: HTTP method.
            path: Request path (no query string).
            body: The decoded JSON body, or None when the request had none.
            content_type: The Content-Type header, checked when there is a body.
        """
        route = self.route(method, path)
        if route is None:
            return None, [f"{method} {path}: no such operation in the Firecracker API "
                          f"{self.version}"]
        what = f"{route.method} {route.template}"
        errors: list[str] = []
        body_params = [p for p in route.operation.get("parameters", []) if p["in"] == "body"]
        for param in route.operation.get("parameters", []):
            if param["in"] == "path":
                value = route.params.get(param["name"], "")
                if not value:
                    errors.append(f"{what}: path parameter {param['name']} is empty")
        if body is None:
            if any(p.get("required") for p in body_params):
                errors.append(f"{what}: a JSON body is required")
        elif not body_params:
            errors.append(f"{what}: takes no body, got {body!r:.100}")
        else:
            if content_type is not None and not content_type.startswith("application/json"):
                errors.append(f"{what}: Content-Type is {content_type!r}, not application/json")
            errors += self._schema_errors(body_params[0]["schema"], body, what)
            errors += self._prose_rules(route, body)
        return route, errors

    def _prose_rules(self, route: Route, body: Any) -> list[str]:
        if not isinstance(body, dict):
            return []
        errors = []
        what = f"{route.method} {route.template}"
        for param, field in (("drive_id", "drive_id"), ("iface_id", "iface_id")):
            if param in route.params and field in body and body[field] != route.params[param]:
                errors.append(f"{what}: body {field} {body[field]!r} differs from the path's "
                              f"{route.params[param]!r}")
        if route.template == "/snapshot/load":
            given = [k for k in ("mem_file_path", "mem_backend") if k in body]
            if len(given) != 1:
                errors.append(f"{what}: exactly one of mem_file_path and mem_backend must be "
                              f"present, got {given or 'neither'}")
        return errors

    def validate_response(self, route: Route, status: int, body: Any) -> list[str]:
        """Check an answer the fake is about to send against the operation's responses."""
        responses = route.operation.get("responses", {})
        spec = responses.get(status, responses.get(str(status), responses.get("default")))
        what = f"{route.method} {route.template} -> {status}"
        if spec is None:
            return [f"{what}: status not in the spec"]
        schema = spec.get("schema")
        if schema is None:
            return [] if body is None else [f"{what}: the spec has no body for this status"]
        if body is None:
            return [f"{what}: the spec requires a body"]
        return self._schema_errors(schema, body, what)
