"""Projects and API keys.

Keys live in a JSON file (``POLOS_PROJECTS_FILE``) as SHA-256 hashes only::

    {"projects": {"acme": {"keys": [{"id": "key_1f2e...", "sha256": "<hex>",
                                     "created_at": "..."}]}},
     "admins": {"keys": [...]}}

Admin keys (``keys create --admin``) open the operator page (``/ui``) and
nothing else; project keys never open it.

A key is 32 random bytes, so a fast hash is the right one: there is nothing
to brute-force, and hashing costs well under a microsecond per request. The
file is read at start and again on SIGHUP; ``python -m gateway keys create``
writes it.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway import errors
from schemas.ids import now_rfc3339
from schemas.topology import PROJECT_ID_PATTERN

KEY_PREFIX = "polos_"
_PROJECT_RE = re.compile(PROJECT_ID_PATTERN)


@dataclass(frozen=True, slots=True)
class Principal:
    project_id: str
    key_id: str


@dataclass(frozen=True, slots=True)
class _KeyRecord:
    digest: bytes
    principal: Principal


def digest_key(api_key: str) -> bytes:
    return hashlib.sha256(api_key.encode()).digest()


def key_id_for(digest: bytes) -> str:
    return f"key_{digest.hex()[:16]}"


class KeyStore:
    """Projects and the hashes of their keys, as last read from the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._projects: frozenset[str] = frozenset()
        self._by_digest: dict[bytes, _KeyRecord] = {}
        self._admins: dict[bytes, str] = {}
        self._principals: frozenset[Principal] = frozenset()

    def load(self) -> None:
        """Read the file; on any error keep what was loaded before and raise."""
        data = _read(self.path)
        projects: set[str] = set()
        by_digest: dict[bytes, _KeyRecord] = {}
        for project_id, project in data.get("projects", {}).items():
            projects.add(project_id)
            for key in project.get("keys", []):
                digest = bytes.fromhex(key["sha256"])
                principal = Principal(project_id, key.get("id") or key_id_for(digest))
                by_digest[digest] = _KeyRecord(digest, principal)
        admins = {
            bytes.fromhex(key["sha256"]): key.get("id") or key_id_for(bytes.fromhex(key["sha256"]))
            for key in data.get("admins", {}).get("keys", [])
        }
        self._projects = frozenset(projects)
        self._by_digest = by_digest
        self._admins = admins
        self._principals = frozenset(record.principal for record in by_digest.values())

    def authenticate_admin(self, api_key: str | None) -> str | None:
        """The admin key's id, or None (the operator page's check)."""
        if not api_key:
            return None
        digest = digest_key(api_key)
        for known, key_id in self._admins.items():
            if hmac.compare_digest(known, digest):
                return key_id
        return None

    def holds(self, principal: Principal) -> bool:
        """Whether this key is still valid for its project (not revoked)."""
        return principal in self._principals

    def has_project(self, project_id: str) -> bool:
        return project_id in self._projects

    def authenticate(self, api_key: str | None) -> Principal | None:
        if not api_key:
            return None
        digest = digest_key(api_key)
        record = self._by_digest.get(digest)
        # The lookup is keyed by a hash of the secret, which reveals nothing
        # useful; the final comparison is constant-time all the same.
        if record is None or not hmac.compare_digest(record.digest, digest):
            return None
        return record.principal

    def authorize(self, api_key: str | None, project_id: str | None) -> Principal:
        """The caller's principal for ``project_id``, or the ApiError to answer."""
        principal = self.authenticate(api_key)
        if principal is None:
            raise errors.UNAUTHORIZED(
                "A valid API key is required (Authorization: Bearer <key> or cookie polos_auth)."
            )
        if not project_id:
            raise errors.MISSING_PROJECT_ID(
                "The X-Project-ID header is required.",
                [{"field": "X-Project-ID", "message": "required header"}],
            )
        # The header is not repeated back: a client may have put the key in it.
        if not self.has_project(project_id):
            raise errors.PROJECT_NOT_FOUND(
                "The project of X-Project-ID is not found.",
                [{"field": "X-Project-ID", "message": "unknown project"}],
            )
        if principal.project_id != project_id:
            raise errors.FORBIDDEN("This API key does not belong to the project.")
        return principal


def api_key_from(authorization: str | None, cookie: str | None) -> str | None:
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return cookie or None


# -- writing the file (CLI) ------------------------------------------------------


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"projects": {}}
    data = orjson.loads(path.read_bytes())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


@contextmanager
def _locked(path: Path) -> Any:
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent or Path("."), prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as out:
        out.write(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def create_admin_key(path: Path, api_key: str | None = None) -> tuple[str, str]:
    """Add an operator key (it opens ``/ui``, no project's API); return (key, key id)."""
    key = api_key or KEY_PREFIX + "admin_" + secrets.token_urlsafe(32)
    digest = digest_key(key)
    key_id = key_id_for(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        data = _read(path)
        keys = data.setdefault("admins", {}).setdefault("keys", [])
        if not any(k.get("sha256") == digest.hex() for k in keys):
            keys.append({"id": key_id, "sha256": digest.hex(), "created_at": now_rfc3339()})
        _write_atomic(path, data)
    return key, key_id


def create_key(path: Path, project_id: str, api_key: str | None = None) -> tuple[str, str]:
    """Add a key to ``project_id`` (creating the project); return (key, key id).

    The key itself is returned once and never stored; pass ``api_key`` to
    record a key chosen by the operator (development setups).
    """
    if not _PROJECT_RE.match(project_id):
        raise ValueError(f"project id must match {PROJECT_ID_PATTERN}")
    key = api_key or KEY_PREFIX + secrets.token_urlsafe(32)
    digest = digest_key(key)
    key_id = key_id_for(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        data = _read(path)
        project = data.setdefault("projects", {}).setdefault(project_id, {"keys": []})
        keys = project.setdefault("keys", [])
        if not any(k.get("sha256") == digest.hex() for k in keys):
            keys.append({"id": key_id, "sha256": digest.hex(), "created_at": now_rfc3339()})
        _write_atomic(path, data)
    return key, key_id


def revoke_key(path: Path, key_id: str) -> bool:
    with _locked(path):
        data = _read(path)
        found = False
        for project in [*data.get("projects", {}).values(), data.get("admins", {})]:
            keys = project.get("keys", [])
            kept = [k for k in keys if k.get("id") != key_id]
            found = found or len(kept) != len(keys)
            project["keys"] = kept
        if found:
            _write_atomic(path, data)
    return found
