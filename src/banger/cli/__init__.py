"""``banger``: the command line. Each command parses flags and makes one RPC call.

Errors from anywhere are printed once, as ``error: ...`` plus a ``hint:``
line, in :func:`main`, which is also the one place that turns them into exit
codes (see :mod:`banger.cli.exits`).
"""

from __future__ import annotations

import base64
import os
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from banger import __version__
from banger.cli import exits, output
from banger.client import Client, connect, start_daemon
from banger.config import Config, config_path, load_config
from banger.errors import BadName, BangerError, Cancelled, DaemonUnavailable, from_code
from banger.layout import Layout
from banger.names import check_name
from banger.sshopts import ssh_argv


@dataclass
class App:
    config_file: Path | None
    debug: bool
    json: bool = False
    _cfg: Config | None = field(default=None, repr=False)

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

    def client(self, autostart: bool = True) -> Client:
        """A client for bangerd; with ``autostart`` it starts the daemon when none answers."""
        return connect(self.cfg, autostart=autostart)

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


def _name_arg(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            check_name(value)
        except BadName as exc:
            raise click.BadParameter(f"{exc.message} ({exc.hint})") from None
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="Config file (default: $BANGER_CONFIG or ~/.config/banger/config.toml).")
@click.option("--debug", is_flag=True, help="Show tracebacks for unexpected errors.")
@click.version_option(__version__, prog_name="banger")
@click.pass_context
def cli(ctx: click.Context, config_file: Path | None, debug: bool) -> None:
    """One-command development sandboxes on microVMs.

    \b
    banger vm run -- uname -a          boot a VM, run a command, keep the VM
    banger vm run --rm -- make test    ... and delete the VM afterwards
    banger vm ssh NAME                 a shell in a running VM
    banger doctor                      check this host
    """
    ctx.obj = App(config_file, debug)


# ---------------------------------------------------------------------------- doctor


@cli.command()
@json_option
@pass_app
def doctor(app: App) -> int:
    """Check this host for what banger needs (no daemon required)."""
    from banger.daemon import doctor as run_doctor

    checks = [c.to_json() for c in run_doctor(app.cfg)]
    app.emit(checks, output.doctor_table(checks))
    return 1 if any(c["status"] == "FAIL" for c in checks) else 0


# ---------------------------------------------------------------------------- daemon


@cli.group()
def daemon() -> None:
    """Inspect or control bangerd (the CLI starts it on demand)."""


@daemon.command("status")
@json_option
@pass_app
def daemon_status(app: App) -> int:
    """Show pid, socket, log path and version of the running daemon."""
    client = app.client(autostart=False)
    try:
        st = client.call("daemon.status")
    except DaemonUnavailable:
        lay = Layout.from_config(app.cfg)
        app.emit({"running": False, "socket": str(lay.socket), "log": str(lay.daemon_log)},
                 f"bangerd is not running (socket {lay.socket}, log {lay.daemon_log})")
        return 3
    app.emit({"running": True, **st}, output.daemon_status(st))
    return 0


@daemon.command("start")
@pass_app
def daemon_start(app: App) -> None:
    """Start bangerd in the background if it is not running."""
    client = app.client(autostart=False)
    if client.alive():
        click.echo("bangerd is already running")
        return
    pid = start_daemon(app.cfg)
    click.echo(f"bangerd started (pid {pid})")


@daemon.command("stop")
@pass_app
def daemon_stop(app: App) -> None:
    """Stop bangerd. Running VMs keep running and are re-adopted on its next start."""
    client = app.client(autostart=False)
    try:
        st = client.call("daemon.status")
        client.call("daemon.stop")
    except DaemonUnavailable:
        click.echo("bangerd is not running")
        return
    deadline = time.monotonic() + 15  # it finishes the request in flight, then exits
    while time.monotonic() < deadline and Path(f"/proc/{st['pid']}").exists():
        time.sleep(0.05)
    click.echo("bangerd stopped")


# ---------------------------------------------------------------------------- images


@cli.group()
def image() -> None:
    """Manage images (root file system + kernel)."""


@image.command("build")
@click.argument("name", required=False)
@json_option
@pass_app
def image_build(app: App, name: str | None) -> None:
    """Build a built-in image (default: debian-bookworm) with debootstrap."""
    client = app.client()
    op = client.call("image.build.begin", name=name)
    result = follow(app, client, op, "image.build")
    app.emit(result, f"image {result['name']} built ({result['size_bytes'] >> 20} MiB)")


@image.command("list")
@json_option
@pass_app
def image_list(app: App) -> None:
    """List images."""
    imgs = app.client().call("image.list")
    app.emit(imgs, output.image_table(imgs))


@image.command("show")
@click.argument("name")
@json_option
@pass_app
def image_show(app: App, name: str) -> None:
    """Show one image."""
    img = app.client().call("image.show", name=name)
    app.emit(img, output.image_detail(img))


@image.command("delete")
@click.argument("name")
@json_option
@pass_app
def image_delete(app: App, name: str) -> None:
    """Delete an image no VM uses."""
    res = app.client().call("image.delete", name=name)
    app.emit(res, f"deleted image {name}")


@image.command("register")
@click.option("--name", required=True, help="Image name (a DNS label).")
@click.option("--rootfs", required=True, type=click.Path(exists=True, dir_okay=False,
                                                         path_type=Path),
              help="ext4 root file system image.")
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Kernel to bundle (bzImage for QEMU, vmlinux for Firecracker).")
@click.option("--initrd", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Initial ramdisk, if the kernel needs one.")
@click.option("--kernel-name", help="Boot this registry kernel (see `banger kernel`) instead.")
@json_option
@pass_app
def image_register(app: App, name: str, rootfs: Path, kernel: Path | None,
                   initrd: Path | None, kernel_name: str | None) -> None:
    """Register your own root file system and kernel as an image (files are copied).

    banger adds its small guest agent (network, host name, SSH host key, work disk)
    to the copy with debugfs; the original file is not changed.
    """
    res = app.client().call(
        "image.register", name=name, rootfs=str(rootfs.resolve()),
        kernel=str(kernel.resolve()) if kernel else None,
        initrd=str(initrd.resolve()) if initrd else None, kernel_name=kernel_name, timeout=None)
    app.emit(res, f"registered image {name}")


@image.command("set-kernel")
@click.argument("name")
@click.argument("kernel", required=False)
@json_option
@pass_app
def image_set_kernel(app: App, name: str, kernel: str | None) -> None:
    """Make image NAME boot registry KERNEL (omit KERNEL: its bundled kernel again)."""
    res = app.client().call("image.set_kernel", name=name, kernel=kernel)
    app.emit(res, f"image {name} boots {kernel or 'its bundled kernel'}")


# ---------------------------------------------------------------------------- kernels


@cli.group()
def kernel() -> None:
    """Manage guest kernels (vmlinux for Firecracker, bzImage for QEMU)."""


@kernel.command("list")
@json_option
@pass_app
def kernel_list(app: App) -> None:
    """List kernels."""
    ks = app.client().call("kernel.list")
    app.emit(ks, output.kernel_table(ks))


@kernel.command("show")
@click.argument("name")
@json_option
@pass_app
def kernel_show(app: App, name: str) -> None:
    """Show one kernel."""
    k = app.client().call("kernel.show", name=name)
    app.emit(k, output.kernel_detail(k))


@kernel.command("import")
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Kernel name (a DNS label).")
@click.option("--initrd", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Initial ramdisk to boot with it.")
@json_option
@pass_app
def kernel_import(app: App, paths: tuple[Path, ...], name: str, initrd: Path | None) -> None:
    """Import a vmlinux and/or a bzImage (validated: ELF x86-64, or a bzImage header)."""
    res = app.client().call("kernel.import", name=name,
                            paths=[str(p.resolve()) for p in paths],
                            initrd=str(initrd.resolve()) if initrd else None, timeout=None)
    app.emit(res, f"imported kernel {name} ({', '.join(res['vmms'])})")


@kernel.command("build")
@click.option("--name", default="banger-6.1", show_default=True, help="Kernel name.")
@click.option("--base-config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Firecracker's guest kernel config to start from "
                   "(default: ../shared/specs next to banger, or $BANGER_KERNEL_BASE_CONFIG).")
@click.option("--source", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Kernel source tarball (default: Debian's linux-source-6.1).")
@click.option("--jobs", "-j", type=click.IntRange(1, 256), help="make -j (default: CPUs).")
@json_option
@pass_app
def kernel_build(app: App, name: str, base_config: Path | None, source: Path | None,
                 jobs: int | None) -> None:
    """Build a guest kernel that boots on both VMMs (vmlinux + bzImage, no modules, no
    initrd) from Debian's kernel source. Slow: tens of minutes on a small host."""
    client = app.client()
    op = client.call("kernel.build.begin", name=name,
                     base_config=str(base_config.resolve()) if base_config else None,
                     source=str(source.resolve()) if source else None, jobs=jobs)
    res = follow(app, client, op, "kernel.build")
    app.emit(res, f"kernel {res['name']} built ({res.get('version')}; {', '.join(res['vmms'])})")


@kernel.command("rm")
@click.argument("name")
@json_option
@pass_app
def kernel_rm(app: App, name: str) -> None:
    """Remove a kernel no image uses."""
    res = app.client().call("kernel.rm", name=name)
    app.emit(res, f"removed kernel {name}")


# ---------------------------------------------------------------------------- vms


@cli.group()
def vm() -> None:
    """Create, run and manage VMs."""


def create_options(f: Any) -> Any:
    """Add the VM creation flags (name, image, sizes, VMM) to command ``f``.

    Shared by ``vm create`` and ``vm run``; see :func:`_create_params`.
    """
    opts = [
        click.option("--name", callback=_name_arg, help="VM name (a DNS label; generated if "
                                                        "omitted)."),
        click.option("--image", help="Image name (default: config default_image_name)."),
        click.option("--vcpu", type=click.IntRange(1, 64), help="Virtual CPUs."),
        click.option("--memory", "memory", type=click.IntRange(128, 262144),
                     help="Memory in MiB."),
        click.option("--disk-size", help="Root disk size, e.g. 8G."),
        click.option("--work-disk-size", help="Work disk (/root) size, e.g. 4G."),
        click.option("--vmm", type=click.Choice(["auto", "qemu", "firecracker"]),
                     default="auto", show_default=True, help="VMM for this VM."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _create_params(kw: dict[str, Any], start: bool) -> dict[str, Any]:
    return {"name": kw["name"], "image": kw["image"], "vcpu": kw["vcpu"],
            "memory_mib": kw["memory"], "disk_size": kw["disk_size"],
            "work_disk_size": kw["work_disk_size"], "vmm": kw["vmm"], "start": start}


@vm.command("create")
@create_options
@click.option("--no-start", is_flag=True, help="Create the disks but do not boot.")
@json_option
@pass_app
def vm_create(app: App, /, no_start: bool, **kw: Any) -> None:
    """Create a VM (and boot it, unless --no-start)."""
    client = app.client()
    op = client.call("vm.create.begin", **_create_params(kw, not no_start))
    res = follow(app, client, op, "vm.create")
    app.emit(res, f"{res['name']} {res['state']} at {res['ip']}")


def _simple(method: str, verb: str) -> Any:
    @click.argument("names", nargs=-1, required=True)
    @json_option
    @pass_app
    def command(app: App, names: tuple[str, ...]) -> int:
        client = app.client()
        results = []
        failed = 0
        for name in names:
            try:
                res = client.call(method, name=name)
            except BangerError as exc:
                if len(names) == 1:
                    raise
                failed += 1
                exits.print_error(exc, app.json)
                continue
            results.append(res)
            if not app.json:
                click.echo(f"{verb} {name}")
        if app.json:
            click.echo(output.to_json(results if len(names) > 1 else results[0]))
        return exits.BANGER_ERROR if failed else 0

    return command


vm.command("start", help="Boot stopped VMs.")(_simple("vm.start", "started"))
vm.command("stop", help="Stop VMs: sync, clean poweroff over SSH, kill after a bounded wait.")(
    _simple("vm.stop", "stopped"))
vm.command("restart", help="Stop then start VMs.")(_simple("vm.restart", "restarted"))
vm.command("delete", help="Delete VMs: stop them and remove disks, TAP, IP and files.")(
    _simple("vm.delete", "deleted"))
vm.command("rm", help="Alias of delete.", hidden=True)(_simple("vm.delete", "deleted"))


@vm.command("kill")
@click.argument("name")
@click.option("--signal", "-s", "sig", default="KILL", show_default=True,
              help="Signal for the VMM process (name or number).")
@json_option
@pass_app
def vm_kill(app: App, name: str, sig: str) -> None:
    """Send a signal to a VM's VMM process (default: KILL, no clean shutdown)."""
    res = app.client().call("vm.kill", name=name, signal=sig)
    app.emit(res, f"sent SIG{sig.upper().removeprefix('SIG')} to {name} ({res['state']})")


@vm.command("list")
@json_option
@pass_app
def vm_list(app: App) -> None:
    """List VMs."""
    vms = app.client().call("vm.list")
    app.emit(vms, output.vm_table(vms))


vm.add_command(vm_list, "ps")


@vm.command("show")
@click.argument("name")
@json_option
@pass_app
def vm_show(app: App, name: str) -> None:
    """Show one VM: spec, state, address, process."""
    res = app.client().call("vm.show", name=name)
    app.emit(res, output.vm_detail(res))


@vm.command("logs")
@click.argument("name")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output.")
@pass_app
def vm_logs(app: App, name: str, follow: bool) -> None:
    """Print a VM's serial console log."""
    res = app.client().call("vm.logs", name=name)
    sys.stdout.write(res["content"])
    sys.stdout.flush()
    if follow:
        _follow_file(Path(res["path"]))


def _follow_file(path: Path) -> None:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            while True:
                chunk = fh.read(65536)
                if chunk:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                else:
                    time.sleep(0.3)
    except KeyboardInterrupt:
        return


@vm.command("ssh", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@pass_app
def vm_ssh(app: App, name: str, command: tuple[str, ...]) -> int:
    """Open a shell in a running VM, or run COMMAND there (after --)."""
    info = app.client().call("vm.ssh_info", name=name)
    return run_ssh(info, list(command), interactive=not command)


@vm.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--auto-prepare", is_flag=True,
              help="Re-sync the workspace first if the host HEAD or work tree changed.")
@pass_app
def vm_exec(app: App, name: str, command: tuple[str, ...], auto_prepare: bool) -> int:
    """Run COMMAND in a running VM; its exit status becomes banger's.

    It runs in the VM's last prepared workspace, if it has one.
    """
    client = app.client()
    if auto_prepare:
        st = client.call("vm.workspace.status", name=name)
        if st["needs_resync"]:
            op = client.call("vm.workspace.prepare.begin", name=name, path=st["host_path"],
                             guest_path=st["guest_path"], mode=st.get("mode") or "shallow")
            follow(app, client, op, "vm.workspace.prepare")
    info = client.call("vm.ssh_info", name=name)
    return run_ssh(info, list(command), interactive=False)


@vm.command("run", context_settings={"ignore_unknown_options": True})
@create_options
@click.option("--rm", "remove", is_flag=True, help="Delete the VM when the command ends.")
@click.option("-d", "--detach", is_flag=True, help="Boot and return; print the VM name.")
@click.option("--workspace-mode", type=click.Choice(["shallow", "full_copy"]),
              default="shallow", show_default=True,
              help="History copied with a repository (full_copy: everything, submodules).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@json_option
@pass_app
def vm_run(app: App, /, remove: bool, detach: bool, workspace_mode: str,
           command: tuple[str, ...], **kw: Any) -> int:
    """Create and boot a VM, then run COMMAND in it (after --) or open a shell.

    \b
    banger vm run -- make test          in a fresh VM
    banger vm run ./repo -- make test   copy ./repo in first, run inside it
    banger vm run ./repo                a shell in the copied repository

    When the first argument is an existing directory it is the repository to
    copy in (a git work tree; see `banger vm workspace prepare`). The command's
    exit status becomes banger's own. With --rm the VM is deleted afterwards,
    whatever happened; `banger vm workspace export` gets the edits out first.
    """
    if detach and remove:
        raise click.UsageError("--rm and --detach cannot be combined")
    args = list(command)
    repo: Path | None = None
    if args and Path(args[0]).is_dir():
        repo = Path(args.pop(0)).resolve()
    client = app.client()
    op = client.call("vm.create.begin", **_create_params(kw, True))
    name = op["target"]
    try:
        res = follow(app, client, op, "vm.create")
        if repo is not None:
            prep = client.call("vm.workspace.prepare.begin", name=name, path=str(repo),
                               mode=workspace_mode)
            follow(app, client, prep, "vm.workspace.prepare")
        if detach:
            app.emit(res, res["name"])
            return 0
        info = client.call("vm.ssh_info", name=name)
        return run_ssh(info, args, interactive=not args)
    finally:
        if remove:
            try:
                client.call("vm.delete", name=name)
            except BangerError as exc:
                if exc.code != "not_found":
                    exits.print_error(exc, app.json)


@vm.group("workspace")
def vm_workspace() -> None:
    """Copy a git repository into a VM and get its edits back as a patch."""


@vm_workspace.command("prepare")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--guest-path", help="Where in the guest (default /root/<repo dir name>).")
@click.option("--branch", help="Check out a new branch B in the guest.")
@click.option("--from", "from_ref", help="Start --branch from REF (default HEAD).")
@click.option("--mode", type=click.Choice(["shallow", "full_copy"]), default="shallow",
              show_default=True, help="shallow: a few commits of history; full_copy: all "
                                      "history, branches, tags and submodules.")
@json_option
@pass_app
def workspace_prepare(app: App, name: str, path: Path, guest_path: str | None,
                      branch: str | None, from_ref: str | None, mode: str) -> None:
    """Copy the git work tree at PATH into VM NAME (tracked and untracked, not ignored).

    In the guest, HEAD is the host's HEAD commit and `git status` shows the
    host's uncommitted changes. Ctrl-C cancels without leaving a
    half-copied directory behind.
    """
    client = app.client()
    op = client.call("vm.workspace.prepare.begin", name=name, path=str(path.resolve()),
                     guest_path=guest_path, branch=branch, from_ref=from_ref, mode=mode)
    res = follow(app, client, op, "vm.workspace.prepare")
    app.emit(res, f"{res['host_path']} -> {res['vm']}:{res['guest_path']} "
                  f"({res['files']} files, {res['bytes'] / 1e6:.1f} MB)")


@vm_workspace.command("export")
@click.argument("name")
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
    res = app.client().call("vm.workspace.export", name=name, base_commit=base_commit)
    patch_path = Path(res.pop("patch_path"))
    try:
        data = patch_path.read_bytes()
    finally:
        patch_path.unlink(missing_ok=True)
    if out_file is not None:
        out_file.write_bytes(data)
    if app.json:
        if out_file is None:
            res["patch_base64"] = base64.b64encode(data).decode()
        else:
            res["patch_file"] = str(out_file)
        click.echo(output.to_json(res))
        return
    if out_file is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    for change in res["changes"]:
        old = f"{change['old_path']} -> " if change.get("old_path") else ""
        click.echo(f"{change['status']}\t{old}{change['path']}", err=True)
    click.echo(f"{len(res['changes'])} changed file(s)", err=True)


def run_ssh(info: dict[str, Any], command: list[str], *, interactive: bool) -> int:
    """Run the system ssh into a VM; returns its exit status (the remote command's)."""
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    argv = ssh_argv("ssh", Path(info["key_path"]), Path(info["known_hosts"]), info["ip"],
                    tty=tty and (interactive or bool(command)), batch=False)
    remote = " ".join(shlex.quote(c) for c in command)
    if info.get("workdir"):
        cd = f"cd {shlex.quote(info['workdir'])}"
        remote = f"{cd} && exec {remote}" if remote else f"{cd} && exec \"$SHELL\" -l"
    if remote:
        argv.append(remote)
    try:
        return subprocess.call(argv)
    except KeyboardInterrupt:
        return 130


def follow(app: App, client: Client, op: dict[str, Any], kind: str) -> Any:
    """Show an operation's stages until it ends; Ctrl-C cancels it cleanly."""
    from banger.cli.progress import Progress

    cancelled = False
    with Progress(enabled=not app.json) as progress:
        while True:
            progress.update(op)
            if op["done"]:
                break
            try:
                op = client.call(f"{kind}.status", id=op["id"], wait_s=1.0,
                                 since=op["updated_at"])
            except KeyboardInterrupt:
                if cancelled:
                    raise
                cancelled = True
                progress.note("cancelling (Ctrl-C again to stop waiting)...")
                op = client.call(f"{kind}.cancel", id=op["id"])
    if op.get("error"):
        err = op["error"]
        raise from_code(err["code"], err["message"], err.get("hint", ""))
    return op["result"]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``banger`` console script."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    json_mode = "--json" in (argv if argv is not None else sys.argv[1:])
    try:
        rv = cli.main(args=argv, prog_name="banger", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except Cancelled as exc:
        exits.print_error(exc, json_mode)
        sys.exit(130)
    except BangerError as exc:
        exits.print_error(exc, json_mode)
        sys.exit(exits.code_for(exc))
    except Exception as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: internal error: {exc}", err=True)
        click.echo("hint: this is a bug in banger; rerun with --debug for a traceback", err=True)
        sys.exit(exits.BANGER_ERROR)
    sys.exit(rv if isinstance(rv, int) else 0)
