"""The guest side: POSIX sh scripts, every value quoted.

A prepare is one script (:func:`prepare`: one guest round trip); export, cleanup
and starting ``mise install`` are one each.

Layout around a workspace ``T = P/N`` in the guest:

* ``P/.N.banger-partial-<token>``: staging directory a prepare fills; hidden and
  never at ``T``, so an interrupted copy never looks like a workspace;
* ``P/.N.banger-old-<token>``: the previous workspace during the swap's
  two renames; the next prepare restores it if the swap was cut short;
* ``T/.git/banger/``: banger's private state: ``workspace`` (marker: banger may
  replace this directory), a private git directory (``HEAD``, ``config``,
  ``info/attributes``, ``index``) that shares ``T/.git/objects`` and holds the
  index of the prepared snapshot, the inputs of the last prepare's set-up
  (``import/``, emptied once used) and the ``mise install`` log.

The private git directory lets prepare and export hash the work tree without
touching the user's index or HEAD, and with content conversion switched off
(``info/attributes`` unsets ``text``, ``eol``, ``filter``, ``ident`` and
``working-tree-encoding``): snapshot blobs are the files' bytes exactly, so the
exported patch applies to the host's files byte for byte.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from banger.daemon.session import quote, script

from .gitdir import IMPORT_DIR
from .model import MARKER, MISE_LOG, PREPARED_REF, STATE_DIR

EXIT_REFUSED = 3  # the request cannot be honoured (path taken, not a workspace): BadRequest
EXIT_BAD_BASE = 4  # export: base commit unknown in the guest
EXIT_CONFLICT = 5  # prepare: the guest's changes do not apply to the new copy
EXIT_EXISTS = 6  # prepare without replace: a banger workspace is at the target

_PRELUDE = (
    "unset GIT_DIR GIT_WORK_TREE GIT_INDEX_FILE GIT_OBJECT_DIRECTORY "
    "GIT_ALTERNATE_OBJECT_DIRECTORIES GIT_COMMON_DIR GIT_CEILING_DIRECTORIES",
    "export LC_ALL=C GIT_TERMINAL_PROMPT=0",
    "fail() { code=$1; shift; printf 'banger: %s\\n' \"$*\" >&2; exit \"$code\"; }",
)


@dataclass(frozen=True)
class Names:
    """The guest paths one prepare uses (see the module docstring)."""

    target: str
    token: str

    @property
    def parent(self) -> str:
        """The guest directory that holds the workspace (``P``)."""
        return posixpath.dirname(self.target)

    @property
    def name(self) -> str:
        """The workspace's directory name (``N``)."""
        return posixpath.basename(self.target)

    @property
    def staging(self) -> str:
        """``P/.N.banger-partial-<token>``: where this prepare fills the new tree."""
        return posixpath.join(self.parent, f".{self.name}.banger-partial-{self.token}")

    @property
    def old(self) -> str:
        """``P/.N.banger-old-<token>``: the previous workspace during the swap."""
        return posixpath.join(self.parent, f".{self.name}.banger-old-{self.token}")

    def vars(self) -> str:
        """Shell assignments of ``T``, ``P``, ``N``, ``S`` and ``O`` that start each script."""
        return (f"T={quote(self.target)} P={quote(self.parent)} N={quote(self.name)} "
                f"S={quote(self.staging)} O={quote(self.old)}")


def _snapshot_fn(index: str, objects: str = "$PWD/.git/objects", alternates: str = "",
                 name: str = "snap") -> str:
    """A shell function ``name`` (``snap``): git on the private git dir, the work tree in
    $PWD, a chosen index."""
    env = (f'GIT_DIR="$PWD/{STATE_DIR}" GIT_WORK_TREE="$PWD" GIT_INDEX_FILE="{index}" '
           f'GIT_OBJECT_DIRECTORY="{objects}"')
    if alternates:
        env += f' GIT_ALTERNATE_OBJECT_DIRECTORIES="{alternates}"'
    return f'{name}() {{ {env} git "$@"; }}'


def preflight(names: Names, *, replace: bool = True) -> str:
    """Check tools and the target, finish an interrupted swap, create the staging
    directory (the start of :func:`prepare`, on its own)."""
    return script(*_PRELUDE, names.vars(), *_preflight_lines(replace))


def _preflight_lines(replace: bool) -> list[str]:
    lines = [
        'command -v git >/dev/null 2>&1 || fail 1 "git is not installed in the guest"',
        'command -v tar >/dev/null 2>&1 || fail 1 "tar is not installed in the guest"',
        '[ -d "$P" ] || mkdir -p -- "$P"',
        '[ "$(cd -P -- "$P" && pwd)" = "$P" ] || '
        f'fail {EXIT_REFUSED} "$P is or passes through a symlink"',
        # A swap cut short (guest crash between its two renames) left the old
        # workspace hidden: put it back rather than lose it.
        'for o in "$P/.$N.banger-old-"*; do',
        '  [ -e "$o" ] || continue',
        '  if [ ! -e "$T" ] && [ ! -L "$T" ]; then mv -T -- "$o" "$T"; else rm -rf -- "$o"; fi',
        'done',
        *_remove_stale_staging(),
        _check_target(),
    ]
    if not replace:
        # The caller saves the guest's changes in it first, then asks again.
        lines.append(f'if [ -f "$T/{MARKER}" ]; then exit {EXIT_EXISTS}; fi')
    return [*lines, 'mkdir -- "$S"']


def _remove_stale_staging() -> list[str]:
    """Remove the staging directories earlier prepares left, and kill guest processes
    still working in them.

    A prepare whose daemon was killed (``kill -9``) leaves its guest step running:
    the ssh session outlives its client. Such a step (``git add`` hashing files,
    ``checkout-index``, ``tar``) writes through absolute paths, and git recreates
    missing parent directories, so it would bring the staging directory back
    right after this prepare removed it. Every step ``cd``s into its staging
    directory first, so the working directory finds them all.
    """
    return [
        # Only when a staging directory was left behind: reading every process's cwd
        # forks once per process, which a TCG guest pays for in seconds.
        'for s in "$P/.$N.banger-partial-"*; do [ -e "$s" ] && stale=1; break; done',
        'if [ -n "${stale:-}" ]; then',
        "  for p in /proc/[0-9]*; do",
        '    c=$(readlink "$p/cwd" 2>/dev/null) || continue',
        '    case $c in "$P/.$N.banger-partial-"*) kill -9 "${p#/proc/}" 2>/dev/null || :;; esac',
        "  done",
        '  rm -rf -- "$P/.$N.banger-partial-"*',
        "fi",
    ]


def _check_target() -> str:
    return (
        'if [ -L "$T" ] || { [ -e "$T" ] && [ ! -d "$T" ]; }; then '
        f'fail {EXIT_REFUSED} "$T exists and is not a directory"; fi\n'
        f'if [ -d "$T" ] && [ ! -f "$T/{MARKER}" ] && [ -n "$(ls -A -- "$T")" ]; then '
        f'fail {EXIT_REFUSED} "$T exists and is not a banger workspace"; fi'
    )


CHANNEL_STDIN = "banger-stdin"
CHANNEL_PORT = "banger-port"
"""The first line :func:`prepare` prints says where it reads the tar: ``banger-stdin``,
or ``banger-port N`` (a TCP port on the guest's address, see :data:`RECEIVER`)."""

PREPARED = "banger-prepared"
REAPPLIED = "banger-reapply"
"""Later lines: ``banger-prepared <commit>`` (the snapshot commit :func:`prepare` made
for the workspace) and ``banger-reapply applied|present``."""

RECEIVER = r"""
use strict; use IO::Socket::INET; use IO::Select;
my $token = shift @ARGV;
my $l = IO::Socket::INET->new(Listen => 4, LocalAddr => "0.0.0.0", LocalPort => 0,
                              Proto => "tcp") or die "banger: cannot listen: $!\n";
$| = 1;
print "banger-port ", $l->sockport, "\n";
$SIG{ALRM} = sub { die "banger: no data connection came within 60s\n" };
alarm 60;
while (1) {
  my $c = $l->accept or next;
  my ($got, $sel) = ("", IO::Select->new($c));
  while (length($got) < length($token) && $sel->can_read(5)) {
    sysread($c, $got, length($token) - length($got), length($got)) or last;
  }
  if ($got eq $token) {
    alarm 0;
    close $l;
    open(STDIN, "<&", $c) or die "banger: $!\n";
    close $c;
    system { $ARGV[0] } @ARGV;
    exit($? == -1 ? 127 : ($? & 127) ? 128 + ($? & 127) : $? >> 8);
  }
  close $c;
}
"""
"""Waits for one TCP connection that starts with the token given as its first
argument, then runs the rest of its arguments with that connection as stdin and
exits with their status. Connections without the token (another host process) are
dropped."""

_TAR_X = ("tar", "-x", "-f", "-", "--no-same-owner", "--same-permissions",
          "--warning=no-timestamp")


@dataclass(frozen=True)
class RepoSetup:
    """The set-up of one repository of the workspace, after its files arrived."""

    subdir: str  # "" for the workspace, "sub/path/" for a submodule's repository
    checkout: bool  # write the files listed in IMPORT_DIR/checkout out of the pack
    commit: bool  # record the snapshot commit (else the host wrote PREPARED_REF already)
    parent: str | None  # the snapshot commit's parent (HEAD's commit)


def prepare(names: Names, repos: list[RepoSetup], *, token: str | None = None,
            replace: bool = True, reapply: bool = False,
            parallel_checkout_from: int = 1000) -> str:
    """The whole guest side of a prepare, in one round trip.

    1. :func:`preflight`; with ``replace`` False a banger workspace at the target
       exits ``EXIT_EXISTS`` (before reading anything), so the caller can save the
       guest's changes in it first;
    2. untar into the staging directory: from a TCP connection when ``token`` is
       given and the guest has perl (:data:`RECEIVER`; under TCG a guest's sshd takes
       in 6-10 MB/s where a plain socket takes 90), else from stdin. The first line
       printed says which (:data:`CHANNEL_STDIN`). The tar holds the git directories
       too (:mod:`.gitdir`);
    3. each repository in ``repos`` (submodules first, deepest first: a parent's
       snapshot records their HEADs): write the unchanged files out of the pack, copy
       the index into the private git directory and, unless the host already knows it
       (the tree is exactly HEAD's), record the snapshot commit;
    4. with ``reapply``, apply ``IMPORT_DIR/reapply.patch`` (see :func:`_reapply_lines`);
    5. move the staging directory to the target (:func:`_swap_lines`).

    Each program started costs a TCG guest 0.1-0.3 s: everything a shell builtin can
    do is done by one.
    """
    tar = " ".join(_TAR_X)
    lines = [*_PRELUDE, names.vars(), *_preflight_lines(replace), 'cd -- "$S"']
    if token is not None:
        lines.append("if command -v perl >/dev/null 2>&1; then "
                     f"perl -e {quote(RECEIVER)} {quote(token)} {tar}; else "
                     f"echo {CHANNEL_STDIN}; {tar}; fi")
    else:
        lines += [f"echo {CHANNEL_STDIN}", tar]
    lines.append("exec </dev/null")  # nothing after the tar reads the input channel
    for repo in repos:
        lines += _setup_lines(repo, parallel_checkout_from)
    if reapply:
        lines += _reapply_lines()
    return script(*lines, *_swap_lines())


def _setup_lines(repo: RepoSetup, parallel_checkout_from: int) -> list[str]:
    lines = [f'cd -- "$S"/{quote(repo.subdir)}', f"st={STATE_DIR} imp={IMPORT_DIR}"]
    if repo.checkout:
        lines += [
            _snapshot_fn("$PWD/.git/index", name="unconverted"),
            # Parallel checkout (one worker per CPU): a guest writing many files under
            # TCG is CPU-bound, each vCPU a host thread; for a few files the workers'
            # start costs more than they save.
            "unconverted -c checkout.workers=0 "
            f"-c checkout.thresholdForParallelism={parallel_checkout_from} "
            'checkout-index -u -f -z --stdin < "$imp/checkout"',
            ': > "$imp/checkout"',
        ]
    # The snapshot's index starts as a copy of this one: the only entries with stat
    # data are the files just checked out, whose bytes are their blobs exactly, so
    # `add -A` below (and every export) hashes only the files the tar brought. -p:
    # git's racy-entry check compares entries with the index file's mtime.
    lines.append('cp -p .git/index "$st/index"')
    if repo.commit:
        parent = f"-p {quote(repo.parent)} " if repo.parent else ""
        lines += [
            _snapshot_fn('$PWD/$st/index'),
            "snap add -A",
            'tree=$(snap write-tree)',
            "commit=$(GIT_AUTHOR_NAME=banger GIT_AUTHOR_EMAIL=banger@localhost "
            "GIT_COMMITTER_NAME=banger GIT_COMMITTER_EMAIL=banger@localhost "
            f'git commit-tree --no-gpg-sign {parent}-m "banger: workspace as prepared" '
            '"$tree")',
            # A loose ref is one line of text; .git/refs/banger came in the tar.
            f"printf '%s\\n' \"$commit\" > .git/{PREPARED_REF}",
        ]
        if not repo.subdir:
            lines.append(f"printf '{PREPARED} %s\\n' \"$commit\"")
    return lines


def _reapply_lines() -> list[str]:
    """Apply ``IMPORT_DIR/reapply.patch`` (a previous workspace's export) to the staging
    tree.

    Runs after the set-up, so the prepared snapshot is the new copy and the
    re-applied changes show up as the guest's own edits in the next export. The
    private git directory applies it, with content conversion off, as export
    produced it. Prints ``banger-reapply applied``, or ``banger-reapply present``
    when the new copy already holds the changes (the patch applies in reverse: the
    host took them, e.g. from an export); exits ``EXIT_CONFLICT`` with git's
    complaint when neither is true, leaving the staging tree unchanged.
    """
    return [
        'cd -- "$S"',
        f'patch="$S/{IMPORT_DIR}/reapply.patch"',
        _snapshot_fn(f"$PWD/{STATE_DIR}/index"),
        "ap() { snap apply --whitespace=nowarn \"$@\" \"$patch\"; }",
        'if ap --check 2>"$patch.err"; then ap; r=applied',
        "elif ap --check -R 2>/dev/null; then r=present",
        f'else cat -- "$patch.err" >&2; exit {EXIT_CONFLICT}; fi',
        ': > "$patch"; : > "$patch.err"',
        f'printf "{REAPPLIED} %s\\n" "$r"',
    ]


def _swap_lines() -> list[str]:
    """Move the staging directory to the target, replacing an old workspace.

    Two renames (``T -> O``, ``S -> T``); if the second fails the first is undone.
    """
    return [
        _check_target(),
        'if [ -e "$T" ]; then',
        '  mv -T -- "$T" "$O"',
        '  if ! mv -T -- "$S" "$T"; then',
        '    mv -T -- "$O" "$T"',
        '    fail 1 "could not move the new workspace into place; the old one is back"',
        "  fi",
        '  rm -rf -- "$O"',
        "else",
        '  mv -T -- "$S" "$T"',
        "fi",
    ]


def cleanup(names: Names) -> str:
    """Remove this prepare's staging directory (best effort after a failure)."""
    return script(*_PRELUDE, names.vars(), 'rm -rf -- "$S"')


def start_tools(target: str) -> str:
    """Start ``mise install`` in the background if the guest has mise; never fails.

    Prints ``started`` or ``no-mise``.
    """
    return "\n".join((
        *_PRELUDE,
        f"cd -- {quote(target)} || exit 0",
        'm=$(command -v mise 2>/dev/null) || m=""',
        'if [ -z "$m" ] && [ -x "${HOME:-/root}/.local/bin/mise" ]; then '
        'm="${HOME:-/root}/.local/bin/mise"; fi',
        'if [ -z "$m" ]; then echo no-mise; exit 0; fi',
        # Detached from the ssh session (no inherited fds), so it outlives it.
        f'nohup sh -c \'"$1" trust || true; exec "$1" install\' banger-mise "$m" '
        f'</dev/null >{quote(MISE_LOG)} 2>&1 &',
        "echo started",
    )) + "\n"


def export(target: str, base_ref: str) -> str:
    """Print one section per repository (the workspace, then each submodule):
    ``<base> <n> <m> <k>\n``, ``k`` bytes of path prefix, ``n`` bytes of
    ``--name-status -z``, ``m`` bytes of patch.

    Each section hashes its work tree into a copy of the prepared snapshot's index,
    writing new blobs into a temporary object directory, so the workspace's index,
    HEAD and object store are left as they were. Submodule sections always diff
    against their own prepared snapshot; gitlink changes are left out (the files
    inside a submodule travel in its own section).
    """
    return script(
        *_PRELUDE,
        f"T={quote(target)} REF={quote(base_ref)}",
        f'cd -- "$T" 2>/dev/null || fail {EXIT_REFUSED} "$T does not exist"',
        f'[ -f "$T/{MARKER}" ] && [ -f "$T/{STATE_DIR}/index" ] || '
        f'fail {EXIT_REFUSED} "$T is not a prepared banger workspace"',
        # Leftovers of an export killed mid-way (exports of one VM are serialised).
        f'rm -rf -- "$T/{STATE_DIR}/export."*',
        f'tmp=$(mktemp -d "$T/{STATE_DIR}/export.XXXXXX")',
        "trap 'rm -rf -- \"$tmp\"' EXIT",
        _snapshot_fn('$tmp/index', objects='$tmp/objects', alternates='$PWD/.git/objects'),
        "d() { snap diff-index --cached -M --full-index --no-textconv --no-ext-diff --no-color "
        '--ignore-submodules=all "$@"; }',
        "size() { wc -c | tr -d ' '; }",
        "section() {",
        f'  [ -f "$T/$1{STATE_DIR}/index" ] || return 0',
        '  cd -- "$T/$1"',
        '  base=$(git rev-parse --verify -q "$2^{commit}") || '
        f'fail {EXIT_BAD_BASE} "unknown base commit $2 in the guest repository $T/$1"',
        '  rm -rf -- "$tmp/objects" && mkdir -- "$tmp/objects"',
        # -p: git's racy-entry check compares entries with the index file's mtime.
        f'  cp -p -- {STATE_DIR}/index "$tmp/index"',
        "  snap add -A",
        '  d -z --name-status "$base" > "$tmp/names"',
        '  d -p --binary --src-prefix="a/$1" --dst-prefix="b/$1" "$base" > "$tmp/patch"',
        '  printf "%s %s %s %s\\n" "$base" "$(size < "$tmp/names")" "$(size < "$tmp/patch")" '
        '"$(printf %s "$1" | size)"',
        '  printf %s "$1"',
        '  cat -- "$tmp/names" "$tmp/patch"',
        "}",
        'section "" "$REF"',
        f'if [ -f "$T/{STATE_DIR}/submodules" ]; then',
        f'  while IFS= read -r sub; do section "$sub/" {PREPARED_REF} </dev/null; done '
        f'< "$T/{STATE_DIR}/submodules"',
        "fi",
    )
