"""``banger vm workspace ...``: a git repository in, the guest's edits out as a patch."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

import click

from banger import remotecopy, repoship
from banger.cli import output
from banger.cli.app import App, follow, json_option, pass_app
from banger.cli.complete import vm_names
from banger.errors import BadRequest
from banger.sdk import Client


@click.group("workspace")
def vm_workspace() -> None:
    """Copy a git repository into a VM and get its edits back as a patch."""


@vm_workspace.command("prepare")
@click.argument("name", shell_complete=vm_names)
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--guest-path", help="Where in the guest (default /root/<repo dir name>).")
@click.option("--branch", help="Check out a new branch B in the guest.")
@click.option("--from", "from_ref", help="Start --branch from REF (default HEAD).")
@click.option("--mode", type=click.Choice(["shallow", "full_copy"]), default="shallow",
              show_default=True, help="shallow: a few commits of history; full_copy: all "
                                      "history, branches, tags and submodules.")
@click.option("--discard-guest-changes", is_flag=True,
              help="Replace a workspace whose guest changes do not apply to the new copy "
                   "(they are still saved first; see `banger vm show`).")
@json_option
@pass_app
def workspace_prepare(app: App, name: str, path: Path, guest_path: str | None,
                      branch: str | None, from_ref: str | None, mode: str,
                      discard_guest_changes: bool) -> None:
    """Copy the git work tree at PATH into VM NAME (tracked and untracked, not ignored).

    In the guest, HEAD is the host's HEAD commit and `git status` shows the
    host's uncommitted changes. Ctrl-C cancels without leaving a
    half-copied directory behind.

    Preparing again replaces the workspace. What the guest changed in it is
    first saved as a patch in the VM's workspace-backups directory (listed by
    `banger vm show`), then re-applied on top of the new copy. When it does not
    apply, nothing is replaced; --discard-guest-changes replaces it anyway.
    """
    res = prepare_from(app, app.client(), name, path, guest_path=guest_path,
                       branch=branch, from_ref=from_ref, mode=mode,
                       discard_guest_changes=discard_guest_changes)
    app.emit(res, prepared_text(res))


def prepare_from(app: App, client: Client, name: str, repo: Path, **kw: Any) -> dict[str, Any]:
    """Prepare VM ``name``'s workspace from ``repo`` on this machine; with a remote
    daemon, the repository is sent to its host first and dropped there afterwards
    (:mod:`banger.repoship`), and the daemon keeps where it came from (its origin)."""
    if app.remote is None:
        return follow(app, client.workspace.prepare, name, repo, **kw)
    link = app.link()
    link.check_sends_to_own_daemon()
    ship = repoship.shipment(repoship.top_of(repo))
    origin = repoship.origin(ship)  # before the copy: a change meanwhile is seen next time
    # Remembered before the copy (its nonce is made here): a copy that fails or is cut
    # short is then one this machine sent, and --auto-prepare makes it again.
    vm_id = client.vms.show(name).id
    try:
        repoship.SentWorkspaces().remember(str(app.remote), vm_id, origin)
    except OSError as exc:
        print(f"warning: cannot record what was sent ({exc.strerror or exc}): "
              "--auto-prepare will not know this workspace", file=sys.stderr)
    there = repoship.send(link, ship)
    try:
        return follow(app, client.workspace.prepare, name, there, origin=origin, **kw)
    finally:
        remotecopy.drop(link, there)


def resync_source(app: App, st: dict[str, Any],
                  sent: repoship.SentWorkspaces | None = None) -> Path | None:
    """For ``vm exec --auto-prepare``: the repository on this machine to prepare VM
    ``st['vm']``'s workspace from again, or None when it has not changed since.

    Here, the daemon compares the repository it copied from. A remote daemon's copy
    came from this machine: what was sent is this machine's own record
    (:class:`banger.repoship.SentWorkspaces`), never a path the remote names, and the
    remote's record must carry the same nonce (else someone prepared it since).

    Raises:
        BadRequest: the remote workspace was not sent from this machine, or was
            prepared again from elsewhere since.
    """
    if app.remote is None:
        return Path(st["host_path"]) if st["needs_resync"] else None
    vm = str(st.get("vm"))[:64]
    hint = f"prepare it from here: `banger vm workspace prepare {vm} PATH`"
    mine = (sent or repoship.SentWorkspaces()).recall(str(app.remote), str(st.get("vm_id")))
    theirs = st.get("origin")
    if mine is None:
        raise BadRequest(f"VM {vm}'s workspace was not sent from this machine, so "
                         "--auto-prepare cannot tell whether it is current", hint=hint)
    if not isinstance(theirs, dict) or theirs.get("nonce") != mine.nonce:
        raise BadRequest(f"VM {vm}'s workspace was prepared again since this machine sent "
                         f"{mine.path}", hint=hint)
    repo = Path(mine.path)
    if not st.get("prepared") or st.get("error"):
        return repo  # the last copy did not finish
    try:
        changed = repoship.fingerprint(repoship.shipment(repo)) != mine.fingerprint
    except BadRequest:
        changed = True  # gone or no longer a work tree: the prepare says why
    return repo if changed else None


@vm_workspace.command("receive", hidden=True)
@click.argument("name")
@click.option("--drop", is_flag=True, help="Remove the received repository NAME (a path).")
def workspace_receive(name: str, drop: bool) -> None:
    """Unpack a repository sent by `banger --host` on another machine (a tar on stdin)
    below this user's cache dir; print where, as JSON."""
    if drop:
        remotecopy.remove(name)
        return
    click.echo(json.dumps({"path": str(remotecopy.unpack(name, sys.stdin.buffer))}))


def prepared_text(res: dict[str, Any]) -> str:
    """The human summary of a finished prepare: what was copied, and what became of
    the guest's changes to the workspace it replaced."""
    text = (f"{res['host_path']} -> {res['vm']}:{res['guest_path']} "
            f"({res['files']} files, {res['bytes'] / 1e6:.1f} MB sent over "
            f"{res.get('transport') or 'ssh'})")
    changes = res.get("guest_changes")
    if changes:
        n, backup = changes["files"], changes["backup"]
        text += {
            "reapplied": f"\nre-applied the guest's changes to {n} file(s) on top "
                         f"(saved in {backup})",
            "already_present": f"\nthe guest's changes to {n} file(s) are already in the "
                               f"host tree (saved in {backup})",
            "discarded": f"\ndiscarded the guest's changes to {n} file(s) "
                         f"(saved in {backup})",
        }.get(changes["outcome"], f"\nthe guest's changes are saved in {backup}")
    return text


@vm_workspace.command("export")
@click.argument("name", shell_complete=vm_names)
@click.option("-o", "--output", "out_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the patch here instead of stdout.")
@click.option("--base-commit", help="Diff against this commit instead of the prepared tree "
                                    "(includes the copied-in uncommitted changes).")
@json_option
@pass_app
def workspace_export(app: App, name: str, out_file: Path | None,
                     base_commit: str | None) -> None:
    """Print the VM's changes since prepare as a binary-safe git patch.

    Apply it on the host with `git apply` (e.g. `banger vm workspace export
    web | git apply`). The changed files are listed on stderr. With --json the
    patch is in the JSON (base64) unless -o is given.
    """
    patch = app.export_patch(app.client(), name, base_commit)
    data = patch.data
    if out_file is not None:
        out_file.write_bytes(data)
    if app.json:
        # The daemon's answer, with the patch itself in place of its file's path.
        res: dict[str, Any] = {"vm": patch.vm, "bytes": len(data), "base": patch.base,
                               "changes": patch.changes}
        if out_file is None:
            res["patch_base64"] = base64.b64encode(data).decode()
        else:
            res["patch_file"] = str(out_file)
        click.echo(output.to_json(res))
        return
    if out_file is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    for change in patch.changes:
        old = f"{change['old_path']} -> " if change.get("old_path") else ""
        click.echo(f"{change['status']}\t{old}{change['path']}", err=True)
    click.echo(f"{len(patch.changes)} changed file(s)", err=True)
