"""banger from Python: ``from banger import Client``.

Everything the CLI does, as typed methods over the daemon's RPC (``banger.api``), one
namespace per kind of thing: ``client.vms`` (create, run, exec, the lifecycle verbs,
egress, logs, ports), ``client.forwards``, ``client.workspace`` (prepare a repository
in, export the guest's edits as a patch), ``client.images``, ``client.kernels``,
``client.snapshots``, ``client.sessions`` and ``client.daemon``. Answers are the view
models of :mod:`banger.api` (small receipts such as ``{"deleted": NAME}`` are dicts).

Long operations (create, start/stop/restart/suspend, snapshots, workspace prepare,
image build/pull/export, kernel build/pull) take ``on_progress`` (called with each new
:class:`~banger.api.OpView`) and ``cancel`` (a :class:`threading.Event`: once set, the
operation is cancelled and the call raises :class:`~banger.errors.Cancelled`).
Errors are the same exception tree the CLI prints (:mod:`banger.errors`), with the
daemon's stable codes; a reply of another shape than this banger expects is
:class:`~banger.errors.BadVersion`.

An agent's loop::

    from banger import Client

    bg = Client()
    vm = bg.vms.create(name="task-1")
    bg.workspace.prepare(vm.name, "/src/project")
    result = bg.vms.exec(vm.name, ["make", "test"])
    patch = bg.workspace.export(vm.name)
    bg.vms.delete(vm.name)
"""

from banger.sdk.base import Progress
from banger.sdk.client import Client
from banger.sdk.vms import ExecResult, RunResult
from banger.sdk.workspace import Patch

__all__ = ["Client", "ExecResult", "Patch", "Progress", "RunResult"]
