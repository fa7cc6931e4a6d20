"""Named remote hosts (``banger context add/use/ls/rm``), kept in the user's config dir.

``contexts.json`` holds ``{"current": NAME | null, "contexts": {NAME: {"host": URL}}}``.
Which daemon a command talks to: ``--host``, else ``$BANGER_HOST`` (empty: this
machine's), else the current context, else this machine's (the context ``local``,
always there, never stored).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from banger.errors import AlreadyExists, BadRequest, NotFound
from banger.fsutil import atomic_write
from banger.names import check_name
from banger.remote import SSHTarget

LOCAL = "local"
MAX_FILE = 1 << 20


def contexts_file(env: dict[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/banger/contexts.json`` (default ``~/.config``)."""
    env = dict(os.environ) if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "/root")) / ".config")
    return Path(base) / "banger" / "contexts.json"


@dataclass
class Contexts:
    """The stored contexts and the current one."""

    path: Path
    current: str | None
    hosts: dict[str, str]

    @classmethod
    def load(cls, path: Path | None = None) -> Contexts:
        """The file's contexts (none when it does not exist).

        Raises:
            BadRequest: the file is not what banger writes.
        """
        path = path or contexts_file()
        try:
            with path.open("rb") as fh:
                raw = fh.read(MAX_FILE + 1)
        except FileNotFoundError:
            return cls(path, None, {})
        except OSError as exc:
            raise BadRequest(f"cannot read {path}: {exc.strerror}") from exc
        try:
            if len(raw) > MAX_FILE:
                raise ValueError("too large")
            data = json.loads(raw)
            hosts = {str(n): str(v["host"]) for n, v in data["contexts"].items()}
            current = data.get("current")
            if current is not None and current not in hosts:
                current = None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise BadRequest(f"{path} is not a contexts file banger wrote",
                             hint="move it away; `banger context add` makes a new one") from exc
        return cls(path, current, hosts)

    def save(self) -> None:
        """Write the file atomically (mode 0600: it names the user's hosts)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"current": self.current,
                "contexts": {n: {"host": h} for n, h in sorted(self.hosts.items())}}
        atomic_write(self.path, (json.dumps(data, indent=2) + "\n").encode(), mode=0o600)

    def add(self, name: str, url: str) -> SSHTarget:
        """Store context ``name`` for ``url`` (checked).

        Raises:
            BadName: ``name`` is not a DNS label.
            BadRequest: ``name`` is ``local``, or ``url`` is not an ssh:// address.
            AlreadyExists: a context of that name exists.
        """
        check_name(name)
        if name == LOCAL:
            raise BadRequest(f"{LOCAL!r} is this machine's context", hint="choose another name")
        target = SSHTarget.parse(url)
        if name in self.hosts:
            raise AlreadyExists(f"context {name!r} exists ({self.hosts[name]})",
                                hint=f"`banger context rm {name}` first")
        self.hosts[name] = str(target)
        return target

    def use(self, name: str) -> None:
        """Make ``name`` current (``local``: this machine's daemon).

        Raises:
            NotFound: no such context.
        """
        if name != LOCAL and name not in self.hosts:
            raise NotFound(f"no context {name!r}", hint="`banger context ls` lists them")
        self.current = None if name == LOCAL else name

    def remove(self, name: str) -> None:
        """Forget context ``name`` (the current one too: then ``local`` is).

        Raises:
            NotFound: no such context.
        """
        if name not in self.hosts:
            raise NotFound(f"no context {name!r}", hint="`banger context ls` lists them")
        del self.hosts[name]
        if self.current == name:
            self.current = None


def chosen_host(flag: str | None, env: dict[str, str] | None = None,
                path: Path | None = None) -> SSHTarget | None:
    """The remote host this command talks to, or None for this machine's daemon.

    Raises:
        BadRequest: the address given is not an ssh:// address, or the contexts file
            is unreadable.
    """
    env = dict(os.environ) if env is None else env
    if flag is not None:
        return SSHTarget.parse(flag) if flag else None
    if "BANGER_HOST" in env:
        return SSHTarget.parse(env["BANGER_HOST"]) if env["BANGER_HOST"] else None
    ctx = Contexts.load(path or contexts_file(env))
    return SSHTarget.parse(ctx.hosts[ctx.current]) if ctx.current else None
