"""A VM's egress policy: the ``--nat``, ``--allow-private`` and ``--allow-out`` rules
shared by ``vm create`` and ``vm set-egress``, and ``vm set-egress`` itself.

The policy lives in the VM's spec; :mod:`banger.daemon.firewall` enforces it while
the VM runs. ``vm set-egress`` changes both under ``vm_locks[id]``: the store row
and, for a running VM, its firewall elements in one nft transaction (a short,
bounded call), so a stop or start can never interleave and leave a TAP with
another spec's elements.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from banger import egress
from banger.api import VMState
from banger.api.params import EgressParams
from banger.daemon import vms
from banger.daemon.firewall import guest_rule
from banger.errors import BadRequest, InvalidState

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.vms")


def resolve(nat: bool | None, allow_private: bool, allow_out: list[str],
            default_nat: bool) -> tuple[bool, bool, list[str]]:
    """The (nat, allow_private, allow_out) a VM gets from what was asked.

    ``nat`` None takes ``default_nat``, except that an allowlist implies NAT (it
    names what the guest reaches *through* NAT). Entries are normalised.

    Raises:
        BadRequest: an entry is refused; an allowlist or ``allow_private`` with NAT
            explicitly off.
    """
    allow_out = egress.normalize_all(allow_out)
    if allow_out and nat is False:
        raise BadRequest("--allow-out names what a guest reaches through NAT; --no-nat "
                         "turns NAT off", hint="drop --no-nat (an allowlist implies --nat), "
                         "or remove the allowlist too (set-egress --no-allow-out)")
    if nat is None:
        nat = bool(allow_out) or default_nat
    if allow_private and not nat:
        raise BadRequest("--allow-private opens ranges reached through NAT; this VM has none",
                         hint="add --nat (or set nat = true in the config)")
    return nat, allow_private, allow_out


def describe(spec: Any) -> dict[str, Any]:
    """The policy of a spec, as ``vm show --json`` and ``set-egress`` report it."""
    return {"nat": spec.nat, "allow_private": spec.allow_private,
            "allow_out": list(spec.allow_out)}


def set_egress(d: Daemon, params: EgressParams) -> dict[str, Any]:
    """``vm set-egress``: change a stopped or running VM's egress policy.

    A running VM's firewall elements change at once (connections already open stay
    open: conntrack lets their replies through); a stopped VM gets it at its next
    start.

    Raises:
        InvalidState: the VM is busy (starting, stopping, ...).
        BadRequest: the new policy is refused (see :func:`resolve`).
        CommandFailed: nft refused; the VM keeps its old policy, in the store too.
    """
    vm = vms.resolve(d, params.name)
    with d.vm_locks.held(vm.id):
        vm = d.db.get_vm(vm.id)
        if vm.state not in vms.LIVE | {VMState.STOPPED, VMState.SUSPENDED}:
            raise InvalidState(f"VM {vm.name!r} is {vm.state.value}",
                               hint="wait for it to finish, then run set-egress again")
        old = vm.spec
        allow_out = old.allow_out if params.allow_out is None else params.allow_out
        # Unchanged when not given, except that an allowlist implies NAT.
        nat = params.nat if params.nat is not None else old.nat or bool(allow_out)
        allow_private = (old.allow_private if params.allow_private is None
                         else params.allow_private)
        nat, allow_private, allow_out = resolve(nat, allow_private, allow_out, old.nat)
        spec = old.model_copy(update={"nat": nat, "allow_private": allow_private,
                                      "allow_out": allow_out})
        tap = vms.handles_of(d, vm).tap if vm.state in vms.LIVE else None
        updated = d.db.set_vm_spec(vm, spec)
        if tap is not None:
            try:
                d.firewall.admit(guest_rule(updated, tap))
            except BaseException:
                d.db.set_vm_spec(updated, old)  # the guest still has the old policy
                raise
    log.info("%s: egress %s", vm.name, describe(spec))
    return {"name": vm.name, "applied": tap is not None, **describe(spec)}
