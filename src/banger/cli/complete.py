"""Shell completion: the names a command line can take, live from a running bangerd.

``banger completion bash|zsh|fish`` prints the script that hooks click's completion
into the shell. When the shell asks (a TAB), click calls the completer of the parameter
being completed; the ones here ask a bangerd that is already running, with one quiet
RPC (:func:`banger.cli.quick.call_quietly`: the config is read for ``runtime_dir``
alone). They never start a daemon, never print an error and never wait long: no
daemon, another install's, a slow or failing one all complete to nothing.

Session references (``VM/NAME``) complete from the sessions as the daemon last knew
them, without reading any guest.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click
from click.shell_completion import CompletionItem

from banger.cli.quick import call_quietly, config_of, daemon_socket

SHELLS = ("bash", "zsh", "fish")
COMPLETE_VAR = "_BANGER_COMPLETE"  # click's variable for the program name "banger"
Completer = Callable[[click.Context, click.Parameter, str], list[CompletionItem]]


def _ask(method: str, **params: Any) -> list[dict[str, Any]]:
    """``method``'s list from the running daemon, or [] however it fails."""
    found = config_of(dict(os.environ))
    if found is None:
        return []
    result = call_quietly(daemon_socket(found[0]), method, params)
    return [r for r in result if isinstance(r, dict)] if isinstance(result, list) else []


def _names(method: str, *, keep: Callable[[dict[str, Any]], bool] = lambda _r: True
           ) -> Completer:
    def complete(_ctx: click.Context, _param: click.Parameter, incomplete: str
                 ) -> list[CompletionItem]:
        names = (r.get("name") for r in _ask(method) if keep(r))
        return [CompletionItem(n) for n in names
                if isinstance(n, str) and n.startswith(incomplete)]
    return complete


vm_names = _names("vm.list")
image_names = _names("image.list")
kernel_names = _names("kernel.list")
# Boot snapshots belong to the daemon (kept and replaced by it): not offered.
snapshot_names = _names("snapshot.list", keep=lambda r: r.get("kind") != "boot")


def session_refs(_ctx: click.Context, _param: click.Parameter, incomplete: str
                 ) -> list[CompletionItem]:
    """Every session's ``VM/NAME`` that starts with ``incomplete``, as the daemon last
    knew them (no guest is asked: a TAB must not wait for one)."""
    refs = (r.get("ref") for r in _ask("vm.session.list", fresh=False))
    return [CompletionItem(ref) for ref in refs
            if isinstance(ref, str) and ref.startswith(incomplete)]


def script(cli: click.Command, shell: str) -> str:
    """The completion script of ``shell`` for the ``banger`` command ``cli``."""
    cls = click.shell_completion.get_completion_class(shell)
    if cls is None:
        raise click.BadParameter(f"no completion for {shell!r}; one of {', '.join(SHELLS)}")
    return cls(cli, {}, "banger", COMPLETE_VAR).source()
