"""banger from Python: ``from banger import Client``.

Everything the CLI does, as typed methods over the daemon's RPC (``banger.api``): VMs
(create, run, exec, start/stop, delete), workspaces (prepare a repository in, export
the guest's edits as a patch), images, sessions and ports. Long operations (create,
workspace prepare, image pull) take ``on_progress`` (called with each new
:class:`~banger.api.OpView`) and ``cancel`` (a :class:`threading.Event`: once set,
the operation is cancelled and the call raises :class:`~banger.errors.Cancelled`).
Errors are the same exception tree the CLI prints (:mod:`banger.errors`), with the
daemon's stable codes.

An agent's loop::

    from banger import Client

    bg = Client()
    vm = bg.vms.create(name="task-1")
    bg.workspace.prepare(vm.name, "/src/project")
    result = bg.vms.exec(vm.name, ["make", "test"])
    patch = bg.workspace.export(vm.name)
    bg.vms.delete(vm.name)
"""

from __future__ import annotations

import builtins
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from banger import client as rpc
from banger.api import ImageView, Model, OpView, SnapshotView, SSHInfo, VMDetail, VMView
from banger.api.methods import invalid_params
from banger.api.params import CreateParams
from banger.config import Config, load_config
from banger.errors import BangerError, from_code
from banger.sshopts import private_control_path, remote_command, ssh_argv

Progress = Callable[[OpView], None]
# How long one status call waits for the operation to change (the daemon caps it at 30).
POLL_WAIT_S = 1.0


@dataclass(frozen=True)
class ExecResult:
    """A guest command's exit status (killed by signal N: 128+N) and its output."""

    status: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class Patch:
    """A workspace export: the changed files and the patch (``git apply`` on the host)."""

    changes: list[dict[str, Any]]
    data: bytes


@dataclass(frozen=True)
class RunResult:
    """``vms.run``: the command's result, and the guest's edits when a repository went in."""

    vm: str
    result: ExecResult
    patch: Patch | None


class Client:
    """A connection to bangerd: the configured one (started when it is not running and
    this process is root), or the daemon listening on ``socket``."""

    def __init__(self, config: Config | None = None, *, socket: str | Path | None = None,
                 autostart: bool = True, connection: rpc.Client | None = None) -> None:
        if connection is not None:
            self.rpc = connection  # one the caller made (the CLI: after its drift check)
        elif socket is not None:
            self.rpc = rpc.Client(Path(socket))
        else:
            self.rpc = rpc.connect(config or load_config(), autostart=autostart)
        self.vms = VMs(self)
        self.workspace = Workspace(self)
        self.images = Images(self)
        self.snapshots = Snapshots(self)
        self.sessions = Sessions(self)

    def call(self, method: str, timeout: float | None = None, **params: Any) -> Any:
        """One RPC call by name (``banger.api.methods.METHODS``): params and result
        are checked against the method's types."""
        return self.rpc.call(method, timeout, **params)

    def send(self, method: str, params: Model, timeout: float | None = None) -> Any:
        """One RPC call with its parameters as their model (``banger.api.params``)."""
        return self.rpc.send(method, params, timeout)

    def operation(self, kind: str, op: dict[str, Any], *, on_progress: Progress | None = None,
                  cancel: threading.Event | None = None) -> Any:
        """Wait for operation ``op`` (a ``<kind>.begin`` answer) to end; its result.

        A cancel that comes after the operation's last cancellable step changes nothing:
        the operation's result is returned (a VM made is a VM the caller must know of).

        Raises:
            Cancelled: ``cancel`` was set and the daemon cancelled the operation.
            BangerError: the operation's own error.
        """
        asked = False
        while True:
            view = OpView.model_validate(op)
            if on_progress is not None:
                on_progress(view)
            if view.done:
                break
            if cancel is not None and cancel.is_set() and not asked:
                asked = True
                op = self.call(f"{kind}.cancel", id=view.id)
                continue
            op = self.call(f"{kind}.status", id=view.id, wait_s=POLL_WAIT_S,
                           since=op["updated_at"])
        if view.error:
            raise from_code(view.error["code"], view.error["message"],
                            view.error.get("hint", ""))
        return view.result


class VMs:
    """``client.vms``."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, name: str | None = None, *, image: str | None = None,
               vcpu: int | None = None, memory_mib: int | None = None,
               disk_size: str | int | None = None, work_disk_size: str | int | None = None,
               vmm: str = "auto", start: bool = True, nat: bool | None = None,
               allow_private: bool = False, allow_out: list[str] | None = None,
               forwards: list[str] | None = None, from_snapshot: str | None = None,
               cold: bool = False, on_progress: Progress | None = None,
               cancel: threading.Event | None = None) -> VMView:
        """A new VM (booted unless ``start=False``); the arguments are ``vm create``'s."""
        try:
            params = CreateParams(name=name, image=image, vcpu=vcpu, memory_mib=memory_mib,
                                  disk_size=disk_size, work_disk_size=work_disk_size, vmm=vmm,
                                  start=start, nat=nat, allow_private=allow_private,
                                  allow_out=allow_out or [], forwards=forwards or [],
                                  from_snapshot=from_snapshot, cold=cold)
        except ValidationError as exc:
            raise invalid_params("vm.create", exc) from exc
        op = self._c.rpc.send("vm.create.begin", params)
        result = self._c.operation("vm.create", op, on_progress=on_progress, cancel=cancel)
        return VMView.model_validate(result)

    def list(self) -> builtins.list[VMView]:
        """Every VM, oldest first."""
        return [VMView.model_validate(v) for v in self._c.call("vm.list")]

    def show(self, name: str) -> VMDetail:
        """One VM, by name or id."""
        return VMDetail.model_validate(self._c.call("vm.show", name=name))

    def start(self, name: str) -> VMView:
        """Boot a stopped VM (or resume a suspended one)."""
        return VMView.model_validate(self._c.call("vm.start", name=name))

    def stop(self, name: str) -> VMView:
        """Shut the guest down."""
        return VMView.model_validate(self._c.call("vm.stop", name=name))

    def restart(self, name: str) -> VMView:
        """Stop, then start."""
        return VMView.model_validate(self._c.call("vm.restart", name=name))

    def delete(self, name: str) -> None:
        """Remove the VM and its disks."""
        self._c.call("vm.delete", name=name)

    def ssh_info(self, name: str) -> SSHInfo:
        """What the system ssh needs to reach the running VM."""
        return SSHInfo.model_validate(self._c.call("vm.ssh_info", name=name))

    def ports(self, *names: str) -> builtins.list[dict[str, Any]]:
        """Listening ports in each named running VM (all running VMs when none)."""
        result: builtins.list[dict[str, Any]] = self._c.call("vm.ports", names=list(names))
        return result

    def exec(self, name: str, argv: builtins.list[str], *, input: bytes | None = None,
             timeout: float | None = None) -> ExecResult:
        """Run ``argv`` in the VM (in its workspace, when one was prepared), as ``vm exec``
        does, and collect its output.

        Raises:
            subprocess.TimeoutExpired: ``timeout`` passed (the ssh client is killed).
        """
        info = self.ssh_info(name)
        control, _why = private_control_path(info.control_path)
        argv_ssh = ssh_argv("ssh", Path(info.key_path), Path(info.known_hosts), info.ip,
                            tty=False, batch=True, control_path=control)
        argv_ssh.append(remote_command(argv, workdir=info.workdir, shell_string=False))
        done = subprocess.run(argv_ssh, input=input if input is not None else b"",
                              capture_output=True, timeout=timeout, check=False)
        code = done.returncode
        return ExecResult(status=128 - code if code < 0 else code, stdout=done.stdout,
                          stderr=done.stderr)

    def run(self, argv: builtins.list[str], repo: str | Path | None = None, *, remove: bool = True,
            mode: str = "shallow", timeout: float | None = None,
            on_progress: Progress | None = None, cancel: threading.Event | None = None,
            **create: Any) -> RunResult:
        """``vm run``: a new VM (``create``: :meth:`create`'s arguments), ``repo`` copied
        in, ``argv`` run there, the guest's edits read back as a patch, and (``remove``)
        the VM deleted. Once a repository is in, a VM whose edits could not be read
        (the command timed out, the export failed) is kept, never deleted with them."""
        vm = self.create(on_progress=on_progress, cancel=cancel, **create)
        keep = not remove
        try:
            patch = None
            if repo is not None:
                self._c.workspace.prepare(vm.name, repo, mode=mode, on_progress=on_progress,
                                          cancel=cancel)
                keep = True  # from here the guest may hold edits: kept until they are read
            result = self.exec(vm.name, argv, timeout=timeout)
            if repo is not None:
                try:
                    patch = self._c.workspace.export(vm.name)
                except BangerError as exc:
                    exc.hint = (f"the VM {vm.name} was kept so its edits are not lost; "
                                f"workspace.export({vm.name!r}) retries")
                    raise
                keep = not remove
            return RunResult(vm=vm.name, result=result, patch=patch)
        finally:
            if not keep:
                self.delete(vm.name)


class Workspace:
    """``client.workspace``: a repository into a VM and the guest's edits back out."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def prepare(self, name: str, path: str | Path, *, guest_path: str | None = None,
                branch: str | None = None, from_ref: str | None = None,
                mode: str = "shallow", discard_guest_changes: bool = False,
                on_progress: Progress | None = None,
                cancel: threading.Event | None = None) -> dict[str, Any]:
        """Copy the git work tree at ``path`` into VM ``name`` (``vm workspace prepare``)."""
        op = self._c.call("vm.workspace.prepare.begin", name=name,
                          path=str(Path(path).resolve()), guest_path=guest_path,
                          branch=branch, from_ref=from_ref, mode=mode,
                          discard_guest_changes=discard_guest_changes)
        result: dict[str, Any] = self._c.operation("vm.workspace.prepare", op,
                                                   on_progress=on_progress, cancel=cancel)
        return result

    def export(self, name: str, base_commit: str | None = None) -> Patch:
        """The guest's edits since the workspace was prepared, as a patch."""
        res, data = rpc.fetch_patch(self._c.rpc, name, base_commit)
        return Patch(changes=list(res.get("changes") or []), data=data)


class Images:
    """``client.images``."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> builtins.list[ImageView]:
        """Every registered image."""
        return [ImageView.model_validate(i) for i in self._c.call("image.list")]

    def show(self, name: str) -> ImageView:
        """One image."""
        return ImageView.model_validate(self._c.call("image.show", name=name))

    def pull(self, reference: str, *, name: str | None = None, size_bytes: int | None = None,
             kernel: str | None = None, insecure: bool = False,
             on_progress: Progress | None = None,
             cancel: threading.Event | None = None) -> ImageView:
        """``image pull``: an OCI image or a bundle, made bootable and registered."""
        op = self._c.call("image.pull.begin", reference=reference, name=name,
                          size_bytes=size_bytes, kernel=kernel, insecure=insecure)
        return ImageView.model_validate(
            self._c.operation("image.pull", op, on_progress=on_progress, cancel=cancel))


class Snapshots:
    """``client.snapshots``."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def take(self, vm: str, name: str) -> SnapshotView:
        """Snapshot running VM ``vm`` as ``name`` (``vm create --from-snapshot`` clones it)."""
        return SnapshotView.model_validate(self._c.call("vm.snapshot", vm=vm, name=name))

    def list(self) -> builtins.list[SnapshotView]:
        """Every snapshot."""
        return [SnapshotView.model_validate(s) for s in self._c.call("snapshot.list")]

    def remove(self, name: str) -> None:
        """Delete snapshot ``name``."""
        self._c.call("snapshot.rm", name=name)


class Sessions:
    """``client.sessions``: long-running guest commands that outlive the caller."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def start(self, vm: str, argv: list[str], *, name: str | None = None,
              cwd: str | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
        """Start ``argv`` in VM ``vm`` as a session (``vm session start``)."""
        result: dict[str, Any] = self._c.call("vm.session.start", vm=vm, argv=argv, name=name,
                                              cwd=cwd, env=env or {})
        return result

    def list(self, vm: str | None = None) -> builtins.list[dict[str, Any]]:
        """The sessions of VM ``vm`` (of every VM when None)."""
        result: builtins.list[dict[str, Any]] = self._c.call("vm.session.list", vm=vm)
        return result

    def logs(self, vm: str, name: str, cursor: str = "0:0", wait_s: float = 0.0
             ) -> dict[str, Any]:
        """Output from ``cursor`` on (the answer carries the next cursor)."""
        result: dict[str, Any] = self._c.call("vm.session.logs", vm=vm, name=name,
                                              cursor=cursor, wait_s=wait_s)
        return result

    def send(self, vm: str, name: str, text: str, newline: bool = True) -> None:
        """Write ``text`` (and a newline) to the session's input."""
        self._c.call("vm.session.send", vm=vm, name=name, text=text, newline=newline)

    def stop(self, vm: str, name: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """Ask the session's command to end (TERM, then KILL after ``timeout_s``)."""
        result: dict[str, Any] = self._c.call("vm.session.stop", vm=vm, name=name,
                                              timeout_s=timeout_s)
        return result

    def remove(self, vm: str, name: str) -> None:
        """Forget an ended session and its output."""
        self._c.call("vm.session.rm", vm=vm, name=name)
