"""A suspended VM's saved state on disk, and what a restore does with it.

``vm suspend`` has the VMM driver write the paused guest's memory and device state
into ``saved.partial/`` and renames it ``saved/`` once complete: only a complete
directory is ever restored from, and a crash mid-save leaves at most a partial one,
which is thrown away. ``vm start`` of a suspended VM launches the VMM from
``saved/`` (vCPUs stopped), deletes it, and only then runs the vCPUs: from that
instant the disks move on, and restoring that memory again over them would corrupt
them, so no copy of it may survive the guest running.

The VM row's ``runtime.suspended`` says what was saved (bytes, when, which VMM);
the directory is the truth, the record is for ``vm show``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger.daemon.guest import Guest
from banger.errors import BangerError, HostError
from banger.fsutil import fsync_path, remove_tree
from banger.layout import VMPaths

if TYPE_CHECKING:
    from banger.daemon.vmruntime import VMRuntime
    from banger.vmm import VMMDriver

log = logging.getLogger("banger.vms")

# After a restore the guest's clock is where it was when it was saved. It is set
# from the host's before the first command runs (seconds since the epoch, UTC).
CLOCK_TIMEOUT_S = 15.0


def complete(paths: VMPaths) -> Path | None:
    """The VM's complete saved state, or None."""
    return paths.saved_state if paths.saved_state.is_dir() else None


def discard_partial(paths: VMPaths) -> None:
    """Remove a save that did not finish."""
    remove_tree(paths.saved_partial)


def begin(paths: VMPaths) -> Path:
    """A fresh, empty ``saved.partial/`` (0700) for the driver to write into.

    Raises:
        HostError: it could not be made, or a complete saved state exists already.
    """
    if complete(paths) is not None:
        raise HostError(f"{paths.saved_state} exists already",
                        hint="`banger vm start` resumes the saved guest")
    discard_partial(paths)
    try:
        paths.saved_partial.mkdir(mode=0o700, parents=True)
    except OSError as exc:
        raise HostError(f"cannot create {paths.saved_partial}: {exc.strerror}") from exc
    return paths.saved_partial


def commit(paths: VMPaths) -> Path:
    """Make ``saved.partial/`` the VM's saved state: its files and the directory
    entry synced, then one rename.

    Raises:
        HostError: syncing or renaming failed (the partial state stays, unused).
    """
    try:
        for f in paths.saved_partial.iterdir():
            fsync_path(f)
        os.rename(paths.saved_partial, paths.saved_state)
        fsync_path(paths.state)
    except OSError as exc:
        raise HostError(f"cannot commit the saved state in {paths.state}: "
                        f"{exc.strerror}") from exc
    return paths.saved_state



def size(saved: Path) -> int:
    """The bytes a saved-state directory holds."""
    return sum(f.stat().st_size for f in saved.iterdir() if f.is_file())


def record(size: int, vmm: str, running: VMRuntime) -> dict[str, Any]:
    """The ``runtime.suspended`` record of a state just saved (``api.SavedStateView``)
    from a guest whose runtime was ``running``.

    ``ident``/``agent``: the saved guest's VMM had the identity channel and the agent's
    port; its restore must have them too (and one saved by an older banger, without
    them, must not).
    """
    return {"bytes": size, "saved_at": time.time(), "vmm": vmm,
            "ident": bool(running.ident_channel), "agent": bool(running.agent_channel)}


def had_agent_channel(vm_runtime: VMRuntime) -> bool:
    """Whether a suspended VM's saved guest has the agent's port."""
    return _had(vm_runtime, "agent")


def had_ident_channel(vm_runtime: VMRuntime) -> bool:
    """Whether a suspended VM's saved guest has the identity channel."""
    return _had(vm_runtime, "ident")


def _had(vm_runtime: VMRuntime, device: str) -> bool:
    saved = vm_runtime.suspended
    return bool(saved.get(device)) if isinstance(saved, dict) else False


def consume(drv: VMMDriver, paths: VMPaths) -> None:
    """Delete the saved state a VMM just loaded, then run the guest's vCPUs.

    The order matters (see the module doc): a crash between the two leaves a paused
    guest and no saved state, never a running guest and a stale one.

    Raises:
        HostError: the saved state could not be deleted (the guest stays paused).
        VMMError: the vCPUs would not run.
    """
    remove_tree(paths.saved_state)
    if paths.saved_state.exists():
        raise HostError(f"cannot remove {paths.saved_state} after restoring from it")
    drv.resume(paths)


def set_clock(guest: Guest, name: str) -> str | None:
    """Set a restored guest's clock to the host's; a warning when it could not be."""
    now = time.time()
    try:
        guest.run(f"date -u -s @{now:.3f} >/dev/null", timeout=CLOCK_TIMEOUT_S,
                  desc="set the clock")
    except BangerError as exc:
        log.warning("vm %s: clock not set after restore: %s", name, exc.message)
        return f"the guest's clock was not set: {exc.message}"
    return None
