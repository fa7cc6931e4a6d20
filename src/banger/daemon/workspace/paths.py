"""Path rules: which repository paths may be copied, and where a workspace may live.

Repository paths come from the host's git (``ls-files``) and so from whoever wrote
the repository: they are untrusted. Each rule below either lets a path through
(it is then copied verbatim inside the workspace) or refuses the whole prepare
with a :class:`BadRequest` naming the path; nothing is silently renamed or dropped.

========================  =========================================================
path                      policy
========================  =========================================================
absolute, ``..``, ``.``,  refused: could leave (or alias into) the destination
empty component
a ``.git`` component      refused: would write into the guest repository's git dir
control characters        refused (newline, tab, ESC, DEL, C1...): they corrupt
                          line-based tools and terminals, and make names ambiguous
not valid UTF-8           refused: the guest scripts and records are text
leading ``-``, spaces,    copied verbatim; every guest command gets paths through
quotes, unicode           tar/git stdin or ``--`` quoting, never as bare argv words
========================  =========================================================
"""

from __future__ import annotations

import posixpath
import unicodedata

from banger.errors import BadRequest

from .model import GUEST_HOME

_PATH_MAX = 4096  # Linux PATH_MAX, including the terminating NUL


def decode_path(raw: bytes) -> str:
    """A git path as text; refuses bytes that are not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(
            f"refusing to copy {raw!r}: the file name is not valid UTF-8",
            hint="rename the file, or add it to .gitignore if it need not be copied",
            path=repr(raw)) from None


def _control_char(text: str) -> str | None:
    for ch in text:
        if unicodedata.category(ch) == "Cc":
            return ch
    return None


def check_repo_path(path: str) -> None:
    """Refuse a repository-relative path that could not be copied verbatim and safely.

    Raises:
        BadRequest: naming the path and the rule it breaks.
    """

    def refuse(reason: str) -> BadRequest:
        return BadRequest(f"refusing to copy {path!r}: {reason}",
                          hint="rename or remove it in the host repository (or add it to "
                               ".gitignore if it is untracked)", path=path)

    if not path:
        raise refuse("empty path")
    if path.startswith("/"):
        raise refuse("absolute path")
    ch = _control_char(path)
    if ch is not None:
        raise refuse(f"the name contains the control character {ch!r}")
    for comp in path.split("/"):
        if comp in ("", ".", ".."):
            raise refuse("the path has an empty, '.' or '..' component")
        if comp.lower() == ".git":
            raise refuse("the path has a '.git' component")


def default_guest_path(repo_name: str, home: str = GUEST_HOME) -> str:
    """``<home>/<repo dir name>``; leading dots are dropped so the path is not hidden."""
    name = repo_name.lstrip(".") or "workspace"
    return posixpath.join(home, name)


def check_guest_path(path: str, home: str = GUEST_HOME) -> str:
    """Validate a workspace path in the guest and return it.

    It must be absolute and normalised (no ``.``/``..``/``//``/trailing ``/``), strictly
    below ``home``, free of control characters, and no component below ``home`` may
    start with ``.``: prepare *replaces* the directory, and hidden directories under
    ``/root`` (``.ssh``, ``.config``, ...) hold the guest's own state. Prepare also
    refuses to replace an existing directory that is not a banger workspace.

    Raises:
        BadRequest: the path breaks one of the rules.
    """

    def refuse(reason: str) -> BadRequest:
        return BadRequest(f"invalid guest path {path!r}: {reason}",
                          hint=f"use a normalised absolute path below {home}, "
                               f"e.g. {posixpath.join(home, 'myrepo')}", guest_path=path)

    if not path.startswith("/"):
        raise refuse("not absolute")
    if posixpath.normpath(path) != path or path.startswith("//"):
        raise refuse("not normalised")
    if len(path.encode()) >= _PATH_MAX:
        raise refuse("too long")
    ch = _control_char(path)
    if ch is not None:
        raise refuse(f"contains the control character {ch!r}")
    prefix = home.rstrip("/") + "/"
    if not path.startswith(prefix):
        raise refuse(f"not below {home}")
    for comp in path[len(prefix):].split("/"):
        if comp.startswith("."):
            raise refuse(f"component {comp!r} is hidden (starts with '.')")
    return path
