"""Reading what a guest says about its sessions, which it may lie about.

:func:`parse_status` takes the output of :func:`banger.daemon.session.scripts.status`
and keeps only lines whose every field has the expected shape: a DNS-label name,
decimal numbers of bounded length. :func:`parse_logs` checks a logs reply's header
against the bytes that follow it. Nothing here trusts a length the guest gives
beyond what the daemon asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from banger.errors import GuestError
from banger.names import is_dns_label

MAX_SESSIONS = 256  # per VM; more status lines than this are ignored

_FIELD = re.compile(r"^([a-z_]+)=([0-9]{0,12})$")
_KEYS = ("pid", "alive", "exit", "same_boot", "started", "ended", "out", "err")


@dataclass(frozen=True)
class GuestSession:
    """One session as its guest reports it."""

    name: str
    pid: int | None
    alive: bool  # it runs in this boot: the command, or its supervisor not done recording
    exit_code: int | None  # recorded by the supervisor (shell style: 128+N for signal N)
    same_boot: bool  # it was started in the guest's current boot
    started: datetime | None
    ended: datetime | None
    out_bytes: int
    err_bytes: int

    @property
    def started_ok(self) -> bool:
        """The supervisor has the command running or finished (its pid or exit is known)."""
        return self.pid is not None or self.exit_code is not None


def parse_status(text: str) -> dict[str, GuestSession]:
    """The sessions in a status reply, by name; malformed lines are skipped."""
    found: dict[str, GuestSession] = {}
    for line in text.splitlines():
        if len(found) >= MAX_SESSIONS:
            break
        parsed = _parse_line(line)
        if parsed is not None and parsed.name not in found:
            found[parsed.name] = parsed
    return found


def _parse_line(line: str) -> GuestSession | None:
    parts = line.split(" ")
    if len(parts) != 1 + len(_KEYS) or not is_dns_label(parts[0]):
        return None
    values: dict[str, int | None] = {}
    for key, part in zip(_KEYS, parts[1:], strict=True):
        m = _FIELD.match(part)
        if m is None or m.group(1) != key:
            return None
        values[key] = int(m.group(2)) if m.group(2) else None
    exit_code = values["exit"]
    if exit_code is not None and exit_code > 255:
        return None
    return GuestSession(
        name=parts[0], pid=values["pid"] or None, alive=values["alive"] == 1,
        exit_code=exit_code, same_boot=values["same_boot"] == 1,
        started=_time(values["started"]), ended=_time(values["ended"]),
        out_bytes=values["out"] or 0, err_bytes=values["err"] or 0,
    )


def _time(epoch: int | None) -> datetime | None:
    if epoch is None:
        return None
    try:
        return datetime.fromtimestamp(epoch, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def parse_logs(raw: bytes, cap: int) -> tuple[bytes, bytes, bool]:
    """The (stdout, stderr, ended) of a logs reply: ``"N_OUT N_ERR ENDED\\n"`` then
    exactly that many bytes of each, neither over ``cap``.

    Raises:
        GuestError: the reply does not have that shape (a log shrank under us, or
            the guest is lying).
    """
    head, sep, body = raw.partition(b"\n")
    m = re.fullmatch(rb"([0-9]{1,12}) ([0-9]{1,12}) ([01])", head)
    if not sep or m is None:
        raise GuestError("the guest's reply to a session log read is malformed")
    n_out, n_err = int(m.group(1)), int(m.group(2))
    if n_out > cap or n_err > cap or len(body) != n_out + n_err:
        raise GuestError("the guest's session log changed while it was read",
                         hint="a log file was truncated in the guest; read again")
    return body[:n_out], body[n_out:], m.group(3) == b"1"
