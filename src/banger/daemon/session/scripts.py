"""The guest side of a session: where its state lives and the scripts that drive it.

A session is a directory in the guest, ``/root/.banger/sessions/NAME/`` (on the work
disk, so an ended session's logs outlive a VM restart)::

    stdin     a FIFO; a supervisor holds it open read-write, so writers never block
              and the command never sees end-of-file between two ``send``s
    stdout    what the command printed (on a pseudo-terminal: everything it printed)
    stderr    its standard error (on a pseudo-terminal: only ``script``'s own messages)
    pid       the command's pid; it leads its own process group (signals go to the group)
    pts       the pseudo-terminal's path (``--tty`` only), for window-size changes
    boot_id   the guest boot the session ran in (a later boot means the VM stopped)
    started   start time (epoch seconds)
    ended     end time (epoch seconds), written with ``exit``
    exit      the exit status, shell style (128+N: killed by signal N), renamed into place
    cmd       the command's launcher script, removed once the command runs

A supervisor (``sh``, in a session of its own, detached from the ssh connection that
started it) runs the command and records its exit. Everything here is POSIX ``sh``
plus ``setsid``, ``mkfifo``, ``stat`` and, for ``--tty``, util-linux ``script``, so it
works in any image banger can boot. Every value that reaches a script is quoted with
:func:`banger.daemon.session.quote`; session names are DNS labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from banger.daemon.session import join_argv, quote

ROOT = "/root/.banger/sessions"

# Exit statuses of the start script that name a refusal (not the command's status).
NO_CWD = 90
NO_SCRIPT = 91
NO_SETSID = 92
NOT_EMPTY = 93


def session_dir(name: str) -> str:
    """The guest directory of session ``name`` (a DNS label, checked by the caller)."""
    return f"{ROOT}/{name}"


# Run by `setsid sh -c SUPERVISOR sh DIR TTY`: $1 the session dir, $2 "1" for a tty.
SUPERVISOR = r"""
d=$1
echo $$ > "$d/super"
exec 3<>"$d/stdin"
cat /proc/sys/kernel/random/boot_id > "$d/boot_id" 2>/dev/null || :
date +%s > "$d/started"
if [ "$2" = 1 ]; then
    setsid -w script -q -f -e -c "exec sh $d/cmd" /dev/null <&3 >"$d/stdout" 2>"$d/stderr" &
else
    setsid -w sh "$d/cmd" <&3 >"$d/stdout" 2>"$d/stderr" &
fi
child=$!
i=0
while [ ! -e "$d/pid" ] && [ $i -lt 100 ] && kill -0 $child 2>/dev/null; do
    sleep 0.05; i=$((i + 1))
done
rm -f "$d/cmd"
wait $child
rc=$?
date +%s > "$d/ended"
echo $rc > "$d/exit.tmp" && mv "$d/exit.tmp" "$d/exit"
"""


def launcher(name: str, argv: Sequence[str], cwd: str, env: Mapping[str, str], *,
             tty: bool, rows: int, cols: int) -> str:
    """The ``cmd`` script: record the pid, set up the terminal, then exec ``argv``.

    Env values live only in this file, which the supervisor removes once the command
    runs (the shell keeps it open), and in the command's environment.
    """
    d = session_dir(name)
    lines = [f"echo $$ > {d}/pid.tmp && mv {d}/pid.tmp {d}/pid"]
    if tty:
        lines += [f"tty > {d}/pts 2>/dev/null || :",
                  f"stty rows {int(rows)} cols {int(cols)} 2>/dev/null || :"]
    lines.append(f"cd {quote(cwd)} || exit 126")
    lines += [f"export {key}={quote(value)}" for key, value in sorted(env.items())]
    lines.append(f"exec {join_argv(argv)}")
    return "\n".join(lines) + "\n"


def start(name: str, cwd: str, *, tty: bool) -> str:
    """Create session ``name``'s directory and start its supervisor; the launcher
    (:func:`launcher`) arrives on stdin. Refusals exit with the codes above."""
    d = quote(session_dir(name))
    checks = [
        f"[ -d {quote(cwd)} ] || {{ echo 'no directory {_say(cwd)} in the guest' >&2;"
        f" exit {NO_CWD}; }}",
        f"command -v setsid >/dev/null || exit {NO_SETSID}",
    ]
    if tty:
        checks.append(f"command -v script >/dev/null || exit {NO_SCRIPT}")
    return "\n".join([
        "set -eu",
        "launcher=$(cat)",  # all of stdin first: a refusal below must not leave it unread
        *checks,
        # A directory left by a removed session, or by a start that died half-way.
        f"if [ -e {d} ]; then [ -e {d}/exit ] || [ ! -e {d}/pid ] || exit {NOT_EMPTY};"
        f" rm -rf {d}; fi",
        f"mkdir -p {d} && chmod 700 {quote(ROOT.rsplit('/', 1)[0])} {quote(ROOT)} {d}",
        f"mkfifo {d}/stdin",
        f"printf '%s\\n' \"$launcher\" > {d}/cmd",
        f"setsid sh -c {quote(SUPERVISOR)} sh {d} {1 if tty else 0}"
        " </dev/null >/dev/null 2>&1 &",
    ]) + "\n"


def _say(text: str) -> str:
    """``text`` for inside a single-quoted echo: no quotes, printable, bounded."""
    return "".join(c for c in text if c.isprintable() and c != "'")[:200]


# One line per session: NAME and key=value fields, every value cut short by the guest
# already; the daemon still parses them strictly (status.parse).
STATUS = r"""
cur=$(head -c 64 /proc/sys/kernel/random/boot_id 2>/dev/null || :)
cd {root} 2>/dev/null || exit 0
for n in {names}; do
    [ -d "$n" ] || continue
    pid=$(head -c 12 "$n/pid" 2>/dev/null || :)
    boot=$(head -c 64 "$n/boot_id" 2>/dev/null || :)
    sup=$(head -c 12 "$n/super" 2>/dev/null || :)
    rc=$(head -c 6 "$n/exit" 2>/dev/null || :)
    alive=0
    # Running until the supervisor has recorded the exit: the command may be gone an
    # instant before its status is written.
    if [ -z "$rc" ] && [ -n "$pid" ] && [ "$boot" = "$cur" ] \
        && { kill -0 "$pid" || { [ -n "$sup" ] && kill -0 "$sup"; }; } 2>/dev/null
    then alive=1; fi
    same=0; [ "$boot" = "$cur" ] && same=1
    printf '%s pid=%s alive=%s exit=%s same_boot=%s started=%s ended=%s out=%s err=%s\n' \
        "$n" "$pid" "$alive" "$rc" "$same" \
        "$(head -c 12 "$n/started" 2>/dev/null || :)" \
        "$(head -c 12 "$n/ended" 2>/dev/null || :)" \
        "$(stat -c %s "$n/stdout" 2>/dev/null || echo 0)" \
        "$(stat -c %s "$n/stderr" 2>/dev/null || echo 0)"
done
"""


def status(names: Sequence[str] = ()) -> str:
    """One status line per session (all of them, or just ``names``)."""
    wanted = " ".join(quote(n) for n in names) if names else "*"
    return STATUS.replace("{root}", quote(ROOT)).replace("{names}", wanted)


# Wait (bounded) until either log grows past the cursor or the session ends, then
# print a header and the new bytes: "N_OUT N_ERR ENDED\n" + N_OUT bytes + N_ERR bytes
# (ENDED: 1 once the supervisor has recorded the exit, read before the sizes).
LOGS = r"""
d={dir}; o={out}; e={err}; cap={cap}; ticks={ticks}
[ -d "$d" ] || exit 3
i=0
while :; do
    x=0; [ ! -e "$d/exit" ] || x=1
    so=$(stat -c %s "$d/stdout" 2>/dev/null || echo 0)
    se=$(stat -c %s "$d/stderr" 2>/dev/null || echo 0)
    if [ "$so" -gt "$o" ] || [ "$se" -gt "$e" ] || [ $x = 1 ] || [ $i -ge $ticks ]
    then break; fi
    sleep 0.1; i=$((i + 1))
done
no=$((so - o)); [ $no -gt 0 ] || no=0; [ $no -le $cap ] || no=$cap
ne=$((se - e)); [ $ne -gt 0 ] || ne=0; [ $ne -le $cap ] || ne=$cap
printf '%s %s %s\n' $no $ne $x
[ $no -eq 0 ] || tail -c +$((o + 1)) "$d/stdout" | head -c $no
[ $ne -eq 0 ] || tail -c +$((e + 1)) "$d/stderr" | head -c $ne
"""


def logs(name: str, out_offset: int, err_offset: int, *, cap: int, wait_s: float) -> str:
    """The next bytes of both logs from the given offsets, at most ``cap`` of each,
    waiting up to ``wait_s`` for some to appear (long polling). Exit 3: no session."""
    return (LOGS.replace("{dir}", quote(session_dir(name)))
            .replace("{out}", str(int(out_offset))).replace("{err}", str(int(err_offset)))
            .replace("{cap}", str(int(cap))).replace("{ticks}", str(int(wait_s * 10))))


def send(name: str) -> str:
    """Copy stdin into the session's input FIFO (exit 3: the session has ended).

    ``timeout``: the FIFO has a reader as long as the supervisor lives; should it die
    between the check and the open, the open would wait forever.
    """
    d = quote(session_dir(name))
    return f"[ -p {d}/stdin ] && [ ! -e {d}/exit ] || exit 3\nexec timeout 10 cat > {d}/stdin\n"


def writer(name: str) -> str:
    """A long-lived copy of stdin into the session's input (an attach's write side)."""
    d = quote(session_dir(name))
    return f"[ -p {d}/stdin ] && [ ! -e {d}/exit ] || exit 3\nexec cat > {d}/stdin\n"


def signal(name: str, sig: str, *, then_kill_after_s: float | None = None) -> str:
    """Send ``sig`` to the session's process group (exit 3: it has already ended).

    Only ever the group: the recorded pid leads it for as long as it lives (it was
    started by ``setsid``), so a group that is gone means a session that ended, whose
    pid may already be another process's.

    With ``then_kill_after_s``, wait that long for it to end and then send SIGKILL,
    and wait (5 s at most) for the supervisor to record the exit.
    """
    d = quote(session_dir(name))
    lines = [
        f"d={d}",
        '[ ! -e "$d/exit" ] || exit 3',
        'pid=$(head -c 12 "$d/pid" 2>/dev/null || :)',
        'case $pid in ""|*[!0-9]*) exit 3;; esac',
        f'kill -s {sig} -- "-$pid" 2>/dev/null || :',
    ]
    if then_kill_after_s is not None:
        lines += [
            f"i=0; while [ ! -e \"$d/exit\" ] && [ $i -lt {int(then_kill_after_s * 10)} ]; do"
            " sleep 0.1; i=$((i + 1)); done",
            '[ -e "$d/exit" ] || kill -s KILL -- "-$pid" 2>/dev/null || :',
        ]
    lines.append('i=0; while [ ! -e "$d/exit" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1));'
                 " done")
    return "\n".join(lines) + "\n"


def resize(name: str, rows: int, cols: int) -> str:
    """Set the session's terminal size (the kernel sends SIGWINCH to its foreground)."""
    d = quote(session_dir(name))
    return (f'p=$(head -c 32 {d}/pts 2>/dev/null || :)\n'
            f'case $p in /dev/pts/[0-9]*) stty -F "$p" rows {int(rows)} cols {int(cols)};;'
            " *) exit 3;; esac\n")


def remove(name: str) -> str:
    """Delete an ended session's directory (exit 4: it still runs)."""
    d = quote(session_dir(name))
    return (f"d={d}\n[ -d \"$d\" ] || exit 0\n"
            'pid=$(head -c 12 "$d/pid" 2>/dev/null || :)\n'
            'if [ ! -e "$d/exit" ] && [ -n "$pid" ] && [ "$(head -c 64 "$d/boot_id")" = '
            '"$(head -c 64 /proc/sys/kernel/random/boot_id)" ] && kill -0 "$pid" 2>/dev/null;'
            " then exit 4; fi\n"
            'rm -rf "$d"\n')
