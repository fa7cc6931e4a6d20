"""What every command shares: the :class:`App` context, ``--json`` and following an
operation's progress. Running the system ``ssh`` into a VM is :mod:`banger.cli.quick`'s."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import click

from banger import remotecopy
from banger.api import Model, OpView
from banger.cli import output
from banger.client import Client as RPCClient
from banger.client import connect
from banger.config import Config, config_path, load_config
from banger.contexts import chosen_host
from banger.errors import BadName, BadRequest, BangerError, DaemonUnavailable
from banger.names import check_name
from banger.remote import SSHLink, SSHTarget
from banger.sdk import Client
from banger.sdk.client import POLL_WAIT_S, Cancel
from banger.sdk.images import bundle_ref, is_bundle_path
from banger.sdk.workspace import Patch

T = TypeVar("T")
# How often the waiting thread looks whether a followed operation ended (Ctrl-C is
# seen at once either way).
FOLLOW_TICK_S = 0.2
EXPORT_TIMEOUT_S = 600.0  # a remote export: the guest's diff and the patch's way back
# A remote export's answer: its daemon holds a guest's changes to at most 16 GiB
# (workspace_export_max_mib's ceiling; 256 MiB by default), which base64 and JSON make
# at most about twice as long. The bound is for a stream that never ends.
EXPORT_ANSWER_MAX = 32 << 30


class DaemonReference(NamedTuple):
    """A pull's reference as the daemon reads it (:meth:`App.daemon_reference`)."""

    reference: str
    # A bundle file sent to a remote daemon's host: ``HOST:PATH`` where this machine read
    # it, which the pulled image or kernel records as its origin. None: nothing was sent.
    sent_from: str | None = None


@dataclass
class App:
    config_file: Path | None
    debug: bool
    json: bool = False
    host: str | None = None  # --host, as given
    _cfg: Config | None = field(default=None, repr=False)
    _link: SSHLink | None = field(default=None, repr=False)
    @cached_property
    def remote(self) -> SSHTarget | None:
        """The remote host this command talks to (``--host``, ``$BANGER_HOST``, the
        current context), or None for this machine's daemon; read once per command."""
        return chosen_host(self.host)

    def link(self, *, daemon: bool = True, start: bool = True) -> SSHLink:
        """The one SSH connection to the remote host, opened on first use; with
        ``daemon``, its daemon found (``start``: started if need be) and its socket
        forwarded.

        Raises:
            BadRequest: no remote host is chosen.
        """
        if self._link is None:
            target = self.remote
            if target is None:
                raise BadRequest("no remote host: this command runs on this machine")
            self._link = SSHLink(target)
        if not daemon:
            self._link.connect()
        elif not self._link.remote:
            self._link.open(start=start)
        return self._link

    def export_patch(self, client: Client, name: str, base_commit: str | None = None
                     ) -> Patch:
        """VM ``name``'s workspace export (:meth:`banger.sdk.workspace.Workspace.export`).
        The daemon hands the patch over as a file on its machine: with a remote daemon,
        that host's banger reads it there and it comes back over the SSH connection."""
        if self.remote is None:
            return client.workspace.export(name, base_commit)
        base = ["--base-commit", base_commit] if base_commit else []
        res = self.link().capture(["vm", "workspace", "export", name, "--json", *base],
                                  timeout=EXPORT_TIMEOUT_S, limit=EXPORT_ANSWER_MAX)
        try:
            got = json.loads(res.stdout)
        except ValueError:
            got = None
        if not isinstance(got, dict):
            raise DaemonUnavailable(f"the banger on {self.remote} sent no patch: "
                                    f"{res.stderr.decode(errors='replace').strip()[-300:]}")
        if "error" in got:
            err = got["error"] if isinstance(got["error"], dict) else {}
            raise BangerError(str(err.get("message"))[:1000], hint=str(err.get("hint") or ""))
        try:
            return Patch(changes=list(got["changes"]),
                         data=base64.b64decode(got["patch_base64"], validate=True),
                         vm=str(got["vm"]), base=str(got["base"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DaemonUnavailable(f"the banger on {self.remote} sent a patch banger "
                                    "cannot read") from exc

    @property
    def cfg(self) -> Config:
        """The loaded config, read on first use (not at start-up).

        An explicit ``--config`` is exported as ``BANGER_CONFIG`` so a bangerd the
        CLI starts reads the same file.
        """
        if self._cfg is None:
            if self.config_file is not None:
                os.environ["BANGER_CONFIG"] = str(self.config_file)
            self._cfg = load_config(self.config_file or config_path())
        return self._cfg

    @contextlib.contextmanager
    def daemon_reference(self, reference: str) -> Iterator[DaemonReference]:
        """A pull's REFERENCE as the daemon reads it: a bundle file on this machine (a
        path, see :func:`banger.sdk.images.bundle_ref`) is sent to a remote daemon's host
        for the body's length (:meth:`daemon_paths`), with where it was read; anything
        else is as given."""
        if not is_bundle_path(reference):
            yield DaemonReference(reference)  # a name, a URL or an OCI reference
            return
        local = bundle_ref(reference)
        with self.daemon_paths({"bundle": Path(local)}) as at:
            sent = at["bundle"] if self.remote is not None else None
            yield DaemonReference(sent or local,
                                  f"{socket.gethostname()}:{local}" if sent else None)

    @contextlib.contextmanager
    def daemon_paths(self, files: dict[str, Path | None]) -> Iterator[dict[str, str | None]]:
        """Where the daemon reads each of ``files`` (files on this machine, by key; None
        for one not given): here, the files themselves; with a remote daemon, copies sent
        to its host over the command's SSH connection for the body's length
        (:func:`banger.remotecopy.send_files`), removed there after.

        Raises:
            BadRequest: the remote daemon would not read them (another user's daemon),
                or a file could not be read.
            HostError: the remote host did not take them.
        """
        given = {key: path for key, path in files.items() if path is not None}
        if self.remote is None or not given:
            yield {key: str(path) if path is not None else None for key, path in files.items()}
            return
        link = self.link()
        link.check_sends_to_own_daemon()
        there, sent = remotecopy.send_files(link, given)
        try:
            yield {key: sent.get(key) for key in files}
        finally:
            remotecopy.drop(link, there)

    def on_this_machine(self, what: str) -> None:
        """Refuse ``what``, which acts on this machine itself, when a remote host is chosen
        (it would not do what the user means).

        Raises:
            BadRequest: a remote host is chosen.
        """
        target = self.remote
        if target is not None:
            raise BadRequest(f"{what} acts on this machine, not on {target}",
                             hint=f"run it on that host (`ssh {target.destination}`), or "
                                  "leave out --host / $BANGER_HOST / the current context")

    def client(self, autostart: bool = True) -> Client:
        """The SDK's client for bangerd (:class:`banger.sdk.Client`: every command goes
        through it); with ``autostart`` it starts the daemon when none answers.

        A running daemon keeps the config it started with: when its values differ from
        this command's config, one warning on stderr names the changed keys. With a
        remote host, it is that host's daemon, through :meth:`link` (its own config).
        """
        if self.remote is not None:
            return Client(connection=RPCClient(self.link(start=autostart).socket))
        connection = connect(self.cfg, autostart=autostart)
        drift = connection.config_drift(self.cfg)  # from the ping connect made; no extra call
        if drift:
            click.echo(f"warning: {drift}", err=True)
        return Client(connection=connection)

    def emit(self, obj: Any, human: str) -> None:
        """Print ``obj`` as JSON under ``--json``, else the ``human`` text."""
        click.echo(output.to_json(obj) if self.json else human)


pass_app = click.make_pass_decorator(App)


def json_option(f: Any) -> Any:
    """Add a ``--json`` flag to command ``f`` that switches :class:`App` to JSON output."""
    def set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        if value:
            ctx.find_object(App).json = True  # type: ignore[union-attr]
        return value

    return click.option("--json", "as_json", is_flag=True, expose_value=False,
                        callback=set_json, help="Machine-readable JSON output.")(f)


def name_arg(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Click callback: check an optional VM name is a DNS label (usage error if not)."""
    if value is not None:
        try:
            check_name(value)
        except BadName as exc:
            raise click.BadParameter(f"{exc.message} ({exc.hint})") from None
    return value


def wire(value: Any) -> Any:
    """``value`` with each SDK view in it (a :class:`banger.api.Model`) as the JSON the
    daemon sent for it: the fields it sent, in its form (what ``--json`` prints)."""
    if isinstance(value, Model):
        return value.model_dump(mode="json", exclude_unset=True)
    if isinstance(value, list):
        return [wire(v) for v in value]
    return value


def follow(app: App, method: Callable[..., T], /, *args: Any,
           watch: Callable[[OpView], None] | None = None, **kw: Any) -> T:
    """``method(*args, **kw)``, an SDK method that waits for an operation, with the
    operation's stages shown as it runs (its ``on_progress``; ``watch`` sees each view
    too). Ctrl-C cancels it cleanly (its ``cancel``), a second Ctrl-C stops waiting.

    The method runs on a worker thread: Ctrl-C interrupts this one only, so the SDK's
    wait goes on and asks the daemon to cancel at its next look (within a status poll,
    :data:`~banger.sdk.client.POLL_WAIT_S`); a second Ctrl-C stops waiting once that was
    asked, so the operation is never left running unasked.
    """
    from banger.cli.progress import Progress

    cancel = Cancel()
    ended = threading.Event()
    outcome: list[T] = []
    failure: list[BaseException] = []
    with Progress(enabled=not app.json) as progress:

        def seen(view: OpView) -> None:
            progress.update(view.model_dump(mode="json"))
            if watch is not None:
                watch(view)

        def run() -> None:
            try:
                outcome.append(method(*args, on_progress=seen, cancel=cancel, **kw))
            except BaseException as exc:  # raised again on the waiting thread
                failure.append(exc)
            finally:
                ended.set()

        threading.Thread(target=run, name="follow", daemon=True).start()
        while not ended.is_set():
            try:
                ended.wait(FOLLOW_TICK_S)
            except KeyboardInterrupt:
                if cancel.is_set():
                    cancel.asked.wait(2 * POLL_WAIT_S)  # a third Ctrl-C ends this wait too
                    raise
                cancel.set()  # the SDK asks the daemon to cancel at its next look
                progress.note("cancelling (Ctrl-C again to stop waiting)...")
    if failure:
        raise failure[0]
    return outcome[0]
