"""Plain formatting functions for CLI output (tested against golden files)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from banger.config import format_size


def to_json(obj: Any) -> str:
    """``obj`` as indented JSON with sorted keys; non-JSON values (dates) via ``str``."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def pairs(items: list[tuple[str, str]]) -> str:
    """``key:   value`` lines with the values aligned."""
    width = max(len(k) for k, _ in items)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in items)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A left-aligned text table with two-space gutters, no trailing spaces."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [headers, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def age(ts: str, now: datetime | None = None) -> str:
    """``3m``, ``2h``, ``5d`` since an ISO timestamp."""
    now = now or datetime.now(UTC)
    secs = max(0, int((now - datetime.fromisoformat(ts)).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def vm_table(vms: list[dict[str, Any]], now: datetime | None = None) -> str:
    """The ``vm list`` table: one row per VM, or a hint when there are none."""
    if not vms:
        return "no VMs (create one with `banger vm run`)"
    rows = [
        [vm["name"], vm["state"], vm["ip"], vm["spec"]["image"], vm["vmm"],
         f"{vm['spec']['vcpu']}/{vm['spec']['memory_mib']}M", age(vm["created_at"], now)]
        for vm in vms
    ]
    return table(["NAME", "STATE", "IP", "IMAGE", "VMM", "CPU/MEM", "AGE"], rows)


def ports_table(answers: list[dict[str, Any]]) -> str:
    """The ``vm ports`` table: one row per listening socket, a line per VM that failed."""
    if not answers:
        return "no running VMs"
    rows = [[a["name"], x["proto"], x["address"], str(x["port"]), x["process"] or "-",
             x["endpoint"] or "(guest loopback only)"]
            for a in answers for x in a["listeners"]]
    lines = [table(["VM", "PROTO", "ADDRESS", "PORT", "PROCESS", "ENDPOINT"], rows)] if rows \
        else ["nothing listening"]
    lines += [f"{a['name']}: {a['error']}" for a in answers if a["error"]]
    return "\n".join(lines)


def forwards_table(fwds: list[dict[str, Any]]) -> str:
    """The ``vm forward list`` table."""
    if not fwds:
        return "no forwards (add one with `banger vm forward VM HOST_PORT:GUEST_PORT`)"
    rows = [[f["name"], f"{f['host_addr']}:{f['host_port']}", f["guest"],
             "open" if f["open"] else "not open", "-p" if f["from_create"] else "vm forward"]
            for f in fwds]
    return table(["VM", "HOST", "GUEST", "STATE", "FROM"], rows)


def network_policy(spec: dict[str, Any]) -> str:
    """What a guest may reach (``vm show``), from its spec's egress fields."""
    if not spec.get("nat"):
        return "banger DNS only (no NAT)"
    allow_out = spec.get("allow_out") or []
    if allow_out:
        private = ", private answers too" if spec.get("allow_private") else ""
        return f"NAT: only {', '.join(allow_out)}{private}"
    if spec.get("allow_private"):
        return "NAT: the outside world, private ranges included"
    return "NAT: the outside world except private ranges"


def confinement_lines(conf: dict[str, Any] | None) -> list[tuple[str, str]]:
    """``vm show`` lines for a confined VMM: its user, seccomp, network namespace, cgroup
    and limits."""
    if not conf:
        return []
    items = [("vmm user", f"{conf['user']} (uid {conf['uid']})"),
             ("seccomp", f"-sandbox {conf['seccomp']}")]
    if conf.get("netns") == "own":
        items.append(("vmm network", "an empty namespace of its own (the TAP only)"))
    cg = conf.get("cgroup") or {}
    if cg:
        items.append(("cgroup", f"{cg['path']} ({cg['version']})"))
        lim = cg.get("limits")
        if lim:
            mem = lim["memory_bytes"]
            pids = lim["pids_max"]
            items.append(("limits", f"memory {format_size(mem) if mem > 0 else 'max'}, "
                                    f"pids {pids if pids > 0 else 'max'}, "
                                    f"cpu weight {lim['cpu_weight']}"))
    return items


def vm_detail(vm: dict[str, Any]) -> str:
    """``vm show`` output: aligned ``key: value`` lines, optional ones only when set."""
    spec = vm["spec"]
    items: list[tuple[str, str]] = [
        ("name", vm["name"]),
        ("id", vm["id"]),
        ("state", vm["state"]),
        ("image", spec["image"]),
        ("vmm", vm["vmm"]),
        ("vcpu", str(spec["vcpu"])),
        ("memory", f"{spec['memory_mib']}M"),
        ("disk", format_size(spec["disk_size"])),
        ("work disk", format_size(spec["work_disk_size"])),
        ("ip", vm["ip"]),
        ("dns", f"{vm['name']}.vm"),
        ("mac", vm["mac"]),
        ("network", network_policy(spec)),
    ]
    if vm.get("pid"):
        items.append(("pid", str(vm["pid"])))
    if vm.get("tap"):
        items.append(("tap", vm["tap"]))
    items += confinement_lines(vm.get("confinement"))
    if vm.get("agent"):
        items.append(("guest agent", "answers: `vm exec`/`vm run` commands skip SSH"))
    items += [("forward", f"{f.rsplit(':', 1)[0]} -> guest port {f.rsplit(':', 1)[1]}")
              for f in vm.get("forwards") or []]
    items.append(("created", vm["created_at"]))
    if vm.get("from_snapshot"):
        pool = " (taken ready from the pool)" if vm.get("from_pool") else ""
        items.append(("from snapshot", vm["from_snapshot"] + pool))
    saved = vm.get("suspended")
    if saved:
        items.append(("saved state", f"{format_size(saved['bytes'])} at {saved['saved_at']} "
                      f"({saved['vmm']}; `vm start` resumes it)"))
    if vm.get("stop_reason") and vm["state"] != "running":
        items.append(("stop reason", vm["stop_reason"]))
    if vm.get("last_error"):
        items.append(("last error", vm["last_error"]))
    ws = vm.get("workspace")
    if ws:
        items.append(("workspace", f"{ws['host_path']} -> {ws['guest_path']}"
                      + ("" if ws.get("prepared") else " (not prepared)")))
        items.append(("base commit", ws["base_commit"]))
    # Guest changes saved by re-prepares, newest last (`vm workspace prepare`).
    items += [("workspace backup", path) for path in vm.get("workspace_backups") or []]
    return pairs(items)


def image_table(images: list[dict[str, Any]], now: datetime | None = None) -> str:
    """The ``image list`` table: one row per image, or a hint when there are none."""
    if not images:
        return "no images (build the default with `banger image build`)"
    rows = [
        [i["name"], i["source"], f"{i['size_bytes'] / (1 << 30):.2f}G",
         "yes" if i.get("initrd") else "no", age(i["created_at"], now)]
        for i in images
    ]
    return table(["NAME", "SOURCE", "SIZE", "INITRD", "AGE"], rows)


def snapshot_table(snaps: list[dict[str, Any]], now: datetime | None = None) -> str:
    """The ``snapshot list`` table: one row per snapshot, or a hint when there are none."""
    if not snaps:
        return "no snapshots (take one with `banger vm snapshot VM NAME`)"
    rows = [[s["name"], s["kind"], s["source_vm"], s["image"], s["vmm"],
             f"{s['vcpu']}/{s['memory_mib']}M", f"{s['size_bytes'] / (1 << 20):.0f}M",
             age(s["created_at"], now)] for s in snaps]
    return table(["NAME", "KIND", "FROM VM", "IMAGE", "VMM", "CPU/MEM", "ON DISK", "AGE"],
                 rows)


def catalog_table(entries: list[dict[str, Any]], kind: str) -> str:
    """The ``image/kernel list --available`` table: the catalog's entries of one kind."""
    if not entries:
        return f"the catalog lists no {kind}s"
    rows = [[e["name"], e["version"], f"{e['size_bytes'] / (1 << 20):.1f}M", e["url"]]
            for e in entries]
    return table(["NAME", "VERSION", "SIZE", "URL"], rows)


def image_detail(img: dict[str, Any]) -> str:
    """``image show`` output as aligned ``key: value`` lines."""
    items = [
        ("name", img["name"]), ("source", img["source"]), ("rootfs", img["rootfs"]),
        ("kernel", img.get("kernel_name") or img["kernel"] or "-"),
        ("initrd", img.get("initrd") or "-"),
        ("size", f"{img['size_bytes'] / (1 << 30):.2f}G"), ("created", img["created_at"]),
        ("recipe", img.get("recipe_hash") or "-"),
    ]
    if img.get("origin"):
        items.append(("origin", img["origin"]))
    return pairs(items)


def kernel_table(kernels: list[dict[str, Any]], now: datetime | None = None) -> str:
    """The ``kernel list`` table: one row per kernel, or a hint when there are none."""
    if not kernels:
        return "no kernels (import one with `banger kernel import`, or `banger kernel build`)"
    rows = [
        [k["name"], ",".join(k["vmms"]), k.get("version") or "-",
         "+".join(f for f in ("vmlinux", "bzimage", "initrd") if k.get(f)) or "-",
         age(k["created_at"], now)]
        for k in kernels
    ]
    return table(["NAME", "VMMS", "VERSION", "FILES", "AGE"], rows)


def kernel_detail(k: dict[str, Any]) -> str:
    """``kernel show`` output as aligned ``key: value`` lines."""
    items = [
        ("name", k["name"]), ("vmms", ", ".join(k["vmms"])), ("version", k.get("version") or "-"),
        ("vmlinux", k.get("vmlinux") or "-"), ("bzImage", k.get("bzimage") or "-"),
        ("initrd", k.get("initrd") or "-"), ("source", k["source"]),
        ("size", f"{k['size_bytes'] / (1 << 20):.1f}M"), ("created", k["created_at"]),
    ]
    if k.get("origin"):
        items.append(("origin", k["origin"]))
    return pairs(items)


def doctor_table(checks: list[dict[str, str]]) -> str:
    """``banger doctor`` output: one ``[STATUS] name: detail`` line per check.

    A hint line follows each check that is not OK.
    """
    lines = []
    for c in checks:
        lines.append(f"[{c['status']:<4}] {c['name']}: {c['detail']}")
        if c.get("hint") and c["status"] != "OK":
            lines.append(f"       hint: {c['hint']}")
    return "\n".join(lines)


def daemon_status(st: dict[str, Any]) -> str:
    """``daemon status`` output for a running daemon (the ``daemon.ping`` result)."""
    items = [
        ("status", "running"), ("pid", str(st["pid"])), ("version", st["version"]),
        ("socket", st["socket"]), ("log", st["log"]), ("state dir", st["state_dir"]),
        ("uptime", f"{st['uptime_s']:.0f}s"), ("vms", f"{st['vms']} ({st['vms_running']} running)"),
    ]
    for image, n in (st.get("vm_pool") or {}).get("images", {}).items():
        filling = f", {n['filling']} being made" if n["filling"] else ""
        items.append(("pool", f"{image}: {n['ready']} of {n['size']} ready{filling}"))
    config = st.get("config")
    if config:
        path = config["path"] or "(none: defaults)"
        items.append(("config", f"{path} (hash {config['hash'][:12]})"))
    return pairs(items)


def op_line(op: dict[str, Any]) -> str:
    """One line for an operation: ``[i/n] stage progress`` (no position if off-plan)."""
    stages: list[str] = op["stages"]
    stage = op["stage"]
    pos = f"[{stages.index(stage) + 1}/{len(stages)}] " if stage in stages else ""
    progress = f" {op['progress']}" if op.get("progress") else ""
    return f"{pos}{stage}{progress}"


def session_status(s: dict[str, Any]) -> str:
    """A session's state in a few words: ``running``, ``exited 0``, ``killed (signal 15)``."""
    if s["state"] != "ended":
        return str(s["state"])
    if s.get("signal") is not None:
        return f"killed (signal {s['signal']})"
    if s.get("exit_code") is not None:
        return f"exited {s['exit_code']}"
    return "ended"


def _command(argv: list[str], limit: int = 40) -> str:
    text = " ".join(argv)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def sessions_table(sessions: list[dict[str, Any]], now: datetime | None = None) -> str:
    """The ``vm session list`` table."""
    if not sessions:
        return "no sessions (start one with `banger vm session start VM -- CMD`)"
    rows = [[s["ref"], session_status(s), "tty" if s["tty"] else "-",
             age(str(s["started_at"]), now), _command(s["argv"])
             + (" (stale)" if s.get("stale") else "")]
            for s in sessions]
    return table(["SESSION", "STATE", "TTY", "AGE", "COMMAND"], rows)


def session_detail(s: dict[str, Any]) -> str:
    """``vm session show``: one session, field by field."""
    items = [
        ("session", s["ref"]),
        ("state", session_status(s)),
        ("command", " ".join(s["argv"])),
        ("cwd", s["cwd"]),
        ("tty", "yes" if s["tty"] else "no"),
        ("pid", str(s["pid"]) if s.get("pid") else "-"),
        ("started", str(s["started_at"])),
    ]
    if s.get("env_keys"):
        items.append(("env", ", ".join(s["env_keys"])))
    if s["state"] == "ended":
        items += [("ended", str(s.get("ended_at") or "-")),
                  ("reason", s.get("end_reason") or "-")]
    if "stdout_bytes" in s:
        items.append(("output", f"{s['stdout_bytes']} B stdout, {s['stderr_bytes']} B stderr"))
    att = s.get("attached") or {}
    items.append(("attached", f"{att.get('readers', 0)} reader(s)"
                              + (", 1 writer" if att.get("writer") else "")))
    return pairs(items)
