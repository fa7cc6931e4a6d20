"""The guest side: POSIX sh scripts, one per step, every value quoted.

Layout around a workspace ``T = P/N`` in the guest:

* ``P/.N.banger-partial-<token>``: staging directory a prepare fills; hidden and
  never at ``T``, so an interrupted copy never looks like a workspace;
* ``P/.N.banger-old-<token>``: the previous workspace during the swap's
  two renames; the next prepare restores it if the swap was cut short;
* ``T/.git/banger/``: banger's private state: ``workspace`` (marker: banger may
  replace this directory), a private git directory (``HEAD``, ``config``,
  ``info/attributes``, ``index``) that shares ``T/.git/objects`` and holds the
  index of the prepared snapshot, and the ``mise install`` log.

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

from .model import MARKER, MISE_LOG, PREPARED_REF, STATE_DIR

IMPORT_DIR = ".git/banger-import"
"""Metadata prepare ships inside the tar, consumed and removed by the setup step."""

EXIT_REFUSED = 3  # the request cannot be honoured (path taken, not a workspace): BadRequest
EXIT_BAD_BASE = 4  # export: base commit unknown in the guest

SNAPSHOT_ATTRIBUTES = "* -text -eol -filter -ident -working-tree-encoding\n"

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


def preflight(names: Names, object_format: str) -> str:
    """Check tools and the target, finish an interrupted swap, create the staging repo."""
    return script(*_PRELUDE, names.vars(), *_preflight_lines(object_format))


def _preflight_lines(object_format: str) -> list[str]:
    fmt = "--object-format=sha256 " if object_format == "sha256" else ""
    return [
        'command -v git >/dev/null 2>&1 || fail 1 "git is not installed in the guest"',
        'command -v tar >/dev/null 2>&1 || fail 1 "tar is not installed in the guest"',
        'mkdir -p -- "$P"',
        '[ "$(cd -P -- "$P" && pwd)" = "$P" ] || '
        f'fail {EXIT_REFUSED} "$P is or passes through a symlink"',
        # A swap cut short (guest crash between its two renames) left the old
        # workspace hidden: put it back rather than lose it.
        'for o in "$P/.$N.banger-old-"*; do',
        '  [ -e "$o" ] || continue',
        '  if [ ! -e "$T" ] && [ ! -L "$T" ]; then mv -T -- "$o" "$T"; else rm -rf -- "$o"; fi',
        'done',
        *_kill_stale_writers(),
        'rm -rf -- "$P/.$N.banger-partial-"*',
        _check_target(),
        'mkdir -- "$S"',
        f'git init -q {fmt}"$S"',
    ]


def _kill_stale_writers() -> list[str]:
    """Kill guest processes still working in a stale staging directory.

    A prepare whose daemon was killed (``kill -9``) leaves its guest step running:
    the ssh session outlives its client. Such a step (``git add`` hashing files,
    ``index-pack``, ``tar``) writes through absolute paths, and git recreates
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
"""The first line :func:`extract` prints says where it reads the tar: ``banger-stdin``,
or ``banger-port N`` (a TCP port on the guest's address, see :data:`RECEIVER`)."""

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
    exec { $ARGV[0] } @ARGV or die "banger: cannot run $ARGV[0]: $!\n";
  }
  close $c;
}
"""
"""Waits for one TCP connection that starts with the token given as its first
argument, then runs the rest of its arguments with that connection as stdin.
Connections without the token (another host process) are dropped."""

_TAR_X = ("tar", "-x", "-f", "-", "--no-same-owner", "--same-permissions",
          "--warning=no-timestamp")


def extract(names: Names, object_format: str, token: str | None = None) -> str:
    """:func:`preflight`, then untar into the staging directory (one guest round trip
    for both; a refusal exits ``EXIT_REFUSED`` before reading anything).

    With ``token``, and perl in the guest, the tar comes over a TCP connection to the
    guest (:data:`RECEIVER`): under TCG a guest's sshd takes in 6-10 MB/s where a plain
    socket takes 90. Otherwise, or without perl, it is read from stdin (the ssh
    channel). The first line printed says which (:data:`CHANNEL_STDIN`).
    """
    tar = " ".join(_TAR_X)
    lines = [*_PRELUDE, names.vars(), *_preflight_lines(object_format), 'cd -- "$S"']
    if token is not None:
        lines.append("if command -v perl >/dev/null 2>&1; then "
                     f"exec perl -e {quote(RECEIVER)} {quote(token)} {tar}; fi")
    lines += [f"echo {CHANNEL_STDIN}", f"exec {tar}"]
    return script(*lines)


def _enter(subdir: str, object_format: str) -> list[str]:
    """cd into the staging repository (or a submodule's, ``subdir`` ending in ``/``),
    creating the submodule's repository on first use."""
    fmt = " --object-format=sha256" if object_format == "sha256" else ""
    return [f'cd -- "$S"/{quote(subdir)}', f"[ -f .git/HEAD ] || git init -q{fmt} ."]


@dataclass(frozen=True)
class Setup:
    """What the setup step writes into the staging repository."""

    head_symbolic: str | None  # e.g. refs/heads/main; HEAD becomes a symref to it
    head_commit: str | None  # HEAD's commit when detached (head_symbolic is None)
    parent: str | None  # the guest HEAD commit the prepared snapshot commit descends from
    user_name: str | None
    user_email: str | None
    object_format: str


def setup(names: Names, s: Setup, subdir: str = "", *, then_swap: bool = False) -> str:
    """Replay refs, HEAD, shallow list, index and identity; record the prepared snapshot.

    ``subdir`` names a submodule's repository below the staging directory (ending in
    ``/``); submodules are set up before their parents. Prints the prepared
    snapshot's commit id. With ``then_swap`` the same script goes on with
    :func:`swap` (one guest round trip less, when nothing runs in between).
    """
    # Each program a script starts costs 0.1-0.3 s in a TCG guest: what a shell builtin
    # can write (config, HEAD) is written with printf, not git.
    lines: list[str] = [*_PRELUDE, names.vars(), *_enter(subdir, s.object_format),
                        f"imp={IMPORT_DIR}"]
    identity = user_config(s.user_name, s.user_email)
    if identity:
        lines.append(f"printf '%s' {quote(identity)} >> .git/config")
    lines += [
        'cat -- "$imp/exclude" >> .git/info/exclude',
        'if [ -s "$imp/shallow" ]; then cp -- "$imp/shallow" .git/shallow; fi',
        'if [ -s "$imp/refs" ]; then git update-ref -z --stdin < "$imp/refs"; fi',
    ]
    if s.head_symbolic is not None:
        lines.append(f"printf 'ref: %s\\n' {quote(s.head_symbolic)} > .git/HEAD")
    elif s.head_commit is not None:
        lines.append(f"git update-ref --no-deref HEAD {quote(s.head_commit)}")
    version = "1" if s.object_format == "sha256" else "0"
    config = f"[core]\\n\\trepositoryformatversion = {version}\\n\\tbare = false\\n"
    if s.object_format == "sha256":
        config += "[extensions]\\n\\tobjectformat = sha256\\n"
    parent = f"-p {quote(s.parent)} " if s.parent else ""
    lines += [
        'git update-index -z --index-info < "$imp/index"',
        f"st={STATE_DIR}",
        'mkdir -p -- "$st/refs" "$st/objects" "$st/info"',
        "printf 'ref: refs/heads/banger\\n' > \"$st/HEAD\"",
        f"printf '{config}' > \"$st/config\"",
        f"printf '%s' {quote(SNAPSHOT_ATTRIBUTES)} > \"$st/info/attributes\"",
        'ln -s ../../info/exclude "$st/info/exclude"',
        *_checkout_lines(),
        # The snapshot's index starts as a copy of this one: the only entries with
        # stat data are the files just checked out, whose bytes are their blobs
        # exactly, so `add -A` below hashes only the files the tar brought. -p:
        # git's racy-entry check compares entries with the index file's mtime.
        # (The checkout's stat data also keeps the user's first `git status` quick.)
        'cp -p .git/index "$st/index"',
        _snapshot_fn('$PWD/$st/index'),
        "snap add -A",
        'tree=$(snap write-tree)',
        "commit=$(GIT_AUTHOR_NAME=banger GIT_AUTHOR_EMAIL=banger@localhost "
        "GIT_COMMITTER_NAME=banger GIT_COMMITTER_EMAIL=banger@localhost "
        f'git commit-tree --no-gpg-sign {parent}-m "banger: workspace as prepared" "$tree")',
        f'git update-ref -m "banger prepare" {PREPARED_REF} "$commit"',
        f'mv -- "$imp/workspace" "{MARKER}"',
        'if [ -f "$imp/submodules" ]; then mv -- "$imp/submodules" "$st/submodules"; fi',
        'rm -rf -- "$imp"',
        'printf "%s\\n" "$commit"',
    ]
    if then_swap:
        lines += _swap_lines()
    return script(*lines)


def _checkout_lines() -> list[str]:
    """Write the files listed in ``$imp/checkout`` from the object store, as their blobs'
    bytes exactly, recording their stat data in the index (``-u``). Through the private
    git directory, whose ``info/attributes`` (``SNAPSHOT_ATTRIBUTES``, the attributes
    that win) switch every content conversion off."""
    return [
        'if [ -s "$imp/checkout" ]; then',
        "  " + _snapshot_fn("$PWD/.git/index", name="unconverted"),
        # checkout.workers=0: one worker per CPU (git's parallel checkout; a guest
        # writing files under TCG is CPU-bound, and each vCPU is a host thread).
        '  unconverted -c checkout.workers=0 checkout-index -u -f -z --stdin < "$imp/checkout"',
        "fi",
    ]


def user_config(name: str | None, email: str | None) -> str:
    """A git config ``[user]`` section for ``name`` and ``email`` (either may be None),
    values quoted as git's config parser reads them back; empty when both are None."""
    def value(v: str) -> str:
        escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
                   .replace("\t", "\\t").replace("\b", "\\b"))
        return f'"{escaped}"'

    body = "".join(f"\t{key} = {value(v)}\n" for key, v in (("name", name), ("email", email))
                   if v is not None)
    return f"[user]\n{body}" if body else ""


EXIT_CONFLICT = 5  # reapply: the guest's changes do not apply to the new copy


def reapply(names: Names) -> str:
    """Apply the patch on stdin (a previous workspace's export) to the staging tree.

    Runs after setup, so the prepared snapshot is the new copy and the re-applied
    changes show up as the guest's own edits in the next export. The private git
    directory applies it, with content conversion off, as export produced it.
    Prints ``applied``, or ``present`` when the new copy already holds the changes
    (the patch applies in reverse: the host took them, e.g. from an export);
    exits ``EXIT_CONFLICT`` with git's complaint when neither is true, leaving the
    staging tree unchanged.
    """
    return script(
        *_PRELUDE, names.vars(),
        'cd -- "$S"',
        'patch="$S/.git/banger-reapply.patch"',
        'cat > "$patch"',
        _snapshot_fn(f"$PWD/{STATE_DIR}/index"),
        "ap() { snap apply --whitespace=nowarn \"$@\" \"$patch\"; }",
        "if ap --check 2>\"$patch.err\"; then ap; r=applied",
        "elif ap --check -R 2>/dev/null; then r=present",
        f'else cat -- "$patch.err" >&2; rm -f -- "$patch" "$patch.err"; exit {EXIT_CONFLICT}; fi',
        'rm -f -- "$patch" "$patch.err"',
        'printf "%s\\n" "$r"',
    )


def swap(names: Names) -> str:
    """Move the staging directory to the target, replacing an old workspace.

    Two renames (``T -> O``, ``S -> T``); if the second fails the first is undone.
    """
    return script(*_PRELUDE, names.vars(), *_swap_lines())


def _swap_lines() -> list[str]:
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
