"""``client.vms``: create, run, inspect, reach and control VMs."""

from __future__ import annotations

import builtins
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from banger.api import EgressView, PortsView, SSHInfo, VMDetail, VMLogs, VMView
from banger.api.methods import invalid_params
from banger.api.params import CreateParams
from banger.errors import BangerError
from banger.sdk.base import Caller, Namespace, Progress, view, views
from banger.sdk.workspace import Patch, Workspace
from banger.sshopts import private_control_path, remote_command, ssh_argv


@dataclass(frozen=True)
class ExecResult:
    """A guest command's exit status (killed by signal N: 128+N) and its output."""

    status: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class RunResult:
    """``vms.run``: the command's result, and the guest's edits when a repository went in."""

    vm: str
    result: ExecResult
    patch: Patch | None


class VMs(Namespace):
    """``client.vms``."""

    def __init__(self, client: Caller, workspace: Workspace) -> None:
        super().__init__(client)
        self._workspace = workspace  # vms.run copies a repository in and a patch out

    def create(self, name: str | None = None, *, image: str | None = None,
               vcpu: int | None = None, memory_mib: int | None = None,
               disk_size: str | int | None = None, work_disk_size: str | int | None = None,
               vmm: str = "auto", start: bool = True, nat: bool | None = None,
               allow_private: bool = False, allow_out: builtins.list[str] | None = None,
               forwards: builtins.list[str] | None = None, from_snapshot: str | None = None,
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
        op = self._c.send("vm.create.begin", params)
        return self._wait("vm.create", op, VMView, on_progress, cancel)

    def list(self) -> builtins.list[VMView]:
        """Every VM, oldest first."""
        return views(VMView, self._c.call("vm.list"), "vm.list")

    def show(self, name: str) -> VMDetail:
        """One VM, by name or id, with its saved workspace backups."""
        return view(VMDetail, self._c.call("vm.show", name=name), "vm.show")

    def start(self, name: str, *, on_progress: Progress | None = None,
              cancel: threading.Event | None = None) -> VMView:
        """Boot a stopped VM (a suspended one resumes where it was)."""
        return self._lifecycle("vm.start", name, on_progress, cancel)

    def stop(self, name: str, *, on_progress: Progress | None = None,
             cancel: threading.Event | None = None) -> VMView:
        """Shut the guest down (clean poweroff, killed after a bounded wait)."""
        return self._lifecycle("vm.stop", name, on_progress, cancel)

    def restart(self, name: str, *, on_progress: Progress | None = None,
                cancel: threading.Event | None = None) -> VMView:
        """Stop, then start."""
        return self._lifecycle("vm.restart", name, on_progress, cancel)

    def suspend(self, name: str, *, on_progress: Progress | None = None,
                cancel: threading.Event | None = None) -> VMView:
        """Save a running or paused VM's memory and devices to disk and end its VMM
        (:meth:`start` resumes it)."""
        return self._lifecycle("vm.suspend", name, on_progress, cancel)

    def _lifecycle(self, kind: str, name: str, on_progress: Progress | None,
                   cancel: threading.Event | None) -> VMView:
        op = self._c.call(f"{kind}.begin", name=name)
        return self._wait(kind, op, VMView, on_progress, cancel)

    def pause(self, name: str) -> VMView:
        """Stop a running VM's vCPUs where they are (memory stays in place)."""
        return view(VMView, self._c.call("vm.pause", name=name), "vm.pause")

    def resume(self, name: str) -> VMView:
        """Run a paused VM's vCPUs again."""
        return view(VMView, self._c.call("vm.resume", name=name), "vm.resume")

    def kill(self, name: str, signal: str = "KILL") -> VMView:
        """Send ``signal`` (name or number) to the VM's VMM process; no clean shutdown."""
        return view(VMView, self._c.call("vm.kill", name=name, signal=signal), "vm.kill")

    def delete(self, name: str) -> dict[str, Any]:
        """Remove the VM and its disks (``{"deleted": NAME, "id": ID}``)."""
        result: dict[str, Any] = self._c.call("vm.delete", name=name)
        return result

    def set_egress(self, name: str, *, nat: bool | None = None,
                   allow_private: bool | None = None,
                   allow_out: builtins.list[str] | None = None) -> EgressView:
        """Change what the guest may reach (None: unchanged; ``allow_out=[]`` removes the
        allowlist); a running VM's rules change at once."""
        res = self._c.call("vm.set_egress", name=name, nat=nat, allow_private=allow_private,
                           allow_out=allow_out)
        return view(EgressView, res, "vm.set_egress")

    def logs(self, name: str) -> VMLogs:
        """The serial console log's path and its last 128 KiB."""
        return view(VMLogs, self._c.call("vm.logs", name=name), "vm.logs")

    def ssh_info(self, name: str) -> SSHInfo:
        """What the system ssh needs to reach the running VM."""
        return view(SSHInfo, self._c.call("vm.ssh_info", name=name), "vm.ssh_info")

    def ports(self, *names: str) -> builtins.list[PortsView]:
        """Listening ports in each named running VM (all running VMs when none)."""
        return views(PortsView, self._c.call("vm.ports", names=builtins.list(names)),
                     "vm.ports")

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

    def run(self, argv: builtins.list[str], repo: str | Path | None = None, *,
            remove: bool = True, mode: str = "shallow", timeout: float | None = None,
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
                self._workspace.prepare(vm.name, repo, mode=mode, on_progress=on_progress,
                                          cancel=cancel)
                keep = True  # from here the guest may hold edits: kept until they are read
            result = self.exec(vm.name, argv, timeout=timeout)
            if repo is not None:
                try:
                    patch = self._workspace.export(vm.name)
                except BangerError as exc:
                    exc.hint = (f"the VM {vm.name} was kept so its edits are not lost; "
                                f"workspace.export({vm.name!r}) retries")
                    raise
                keep = not remove
            return RunResult(vm=vm.name, result=result, patch=patch)
        finally:
            if not keep:
                self.delete(vm.name)
