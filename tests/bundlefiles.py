"""Bundle files made by tests: the format ``banger.daemon.bundles`` reads, with every
part open to being made wrong on purpose."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import zstandard

from banger.daemon import bundles


def build_bundle(path: Path, files: dict[str, bytes], *, kind: str = "image",
                 manifest: dict[str, Any] | None = None,
                 members: list[tuple[str, bytes | tarfile.TarInfo]] | None = None,
                 manifest_first: bool = True, pad_manifest: int = 0) -> Path:
    """A bundle of ``files`` with a correct manifest, unless told otherwise:
    ``manifest`` entries override it, ``members`` replace the tar's members."""
    doc: dict[str, Any] = {
        "format": bundles.FORMAT, "kind": kind, "name": "evil", "arch": "x86_64",
        "created_at": "2026-01-01T00:00:00+00:00",
        "members": {n: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                    for n, b in files.items()},
        "kernel": {"name": None, "version": None},
    }
    doc.update(manifest or {})
    text = json.dumps(doc).encode() + b" " * pad_manifest
    entries: list[tuple[str, bytes | tarfile.TarInfo]] = members if members is not None \
        else list(files.items())
    entries = [("manifest.json", text), *entries] if manifest_first \
        else [*entries, ("manifest.json", text)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            if isinstance(data, tarfile.TarInfo):
                tar.addfile(data)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    return path
