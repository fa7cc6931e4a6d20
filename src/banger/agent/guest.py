"""The guest half of the agent: ``banger-agent`` and its unit, added to every image.

The script is perl with perl-base's modules only (``Fcntl``; ``Socket`` only to tell
systemd it is ready), as Debian's minimal systems have it. What it speaks is
:mod:`banger.agent.wire`.
"""

from __future__ import annotations

from banger.agent.wire import (
    GUEST_LISTENING,
    MAX_PAYLOAD,
    MAX_STREAMS,
    PORT_NAME,
    PROTOCOL,
    WINDOW,
)

AGENT_PATH = "usr/local/sbin/banger-agent"
AGENT_UNIT_PATH = "etc/systemd/system/banger-agent.service"

GUEST_AGENT = r"""#!/usr/bin/perl
# banger-agent (written by banger): runs the host's commands over the virtio-serial port
# @PORT@. Over SSH each command's connection first pays a login (key exchange,
# signatures, sshd's re-exec), which a guest under emulation takes most of a second for;
# this agent, started at boot and so already running in every boot snapshot, starts the
# command at once. The host end is a socket of the VMM's that only banger (root, or the
# daemon's own user) reaches.
#
# Frames both ways: type (1 byte), stream (u32 BE), length (u32 BE), payload. Host to
# guest: H (hello: a nonce; ends every stream of an earlier connection), E (run the
# payload with the login shell's -c, as sshd does), I (stdin bytes), C (stdin ends),
# K (a signal number for the command's process group), W (answer once
# /run/banger-ident says gen=<payload> (any, for an empty payload) and sshd listens).
# Guest to host: H (the nonce, then "banger-agent <protocol>"), O/R (stdout/stderr
# bytes), A (stdin bytes the command took: the host sends at most a window ahead),
# X (the end: "exit N", "signal N" or "error TEXT"), W ("ok <ident status>"); a hello's
# answer follows a sync marker, after which the host finds the frames' boundaries.
use strict;
use warnings;
use Fcntl qw(F_GETFL F_SETFL O_NONBLOCK O_RDWR);

my $NAME = "@PORT@";
my $MAX = @MAX@;
my $HIGH = 4 * $MAX;  # unsent output above this: stop reading the commands' output
my $WINDOW = @WINDOW@;  # the host sends at most this much stdin not yet taken
my $SYNC = "\0banger-agent-sync\0";  # before a hello's answer: the host syncs on it
my $MAX_STREAMS = @STREAMS@;
my $PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

my ($port, $real) = (undef, 0);
my $arg = shift(@ARGV) // "";
if ($arg =~ /\Afd:(\d+)\z/) {  # tests: a socket standing in for the port
  open($port, "+<&=", $1) or die "banger-agent: fd $1: $!\n";
} else {
  my $dev;
  for my $try (1 .. 20) {
    for my $p (glob "/sys/class/virtio-ports/*") {
      open(my $f, "<", "$p/name") or next;
      my $n = <$f> // "";
      chomp $n;
      if ($n eq $NAME) { ($dev = $p) =~ s{.*/}{/dev/}; last }
    }
    my @consoles = glob("/sys/bus/virtio/drivers/virtio_console/virtio*");
    last if $dev || !@consoles;
    select(undef, undef, undef, 0.05);
  }
  if (!$dev) { notify(); exit 0 }  # a VMM without the channel: nothing to do
  sysopen($port, $dev, O_RDWR) or die "banger-agent: $dev: $!\n";
  $real = 1;
}
binmode $port;
$SIG{PIPE} = "IGNORE";
fcntl($port, F_SETFL, fcntl($port, F_GETFL, 0) | O_NONBLOCK);
if ($real) {
  if (open(my $m, ">", "@LISTENING@")) { close $m }
  if (open(my $c, ">", "/dev/console")) { print $c "banger-agent: listening\n"; close $c }
}
notify();

my %st;         # stream id => {pid, in, out, err, inbuf, took, eof, status}
my $orphans = 0;  # commands hung up on and not reaped yet
my @ready;      # pending W: [id, gen, deadline]
my ($rbuf, $wbuf) = ("", "");
my ($connected, $hello, $broken) = (0, 0, 0);

sub notify {
  my $ns = $ENV{NOTIFY_SOCKET} or return;
  require Socket;
  $ns =~ s/\A@/\0/;
  socket(my $n, Socket::PF_UNIX(), Socket::SOCK_DGRAM(), 0) or return;
  send($n, "READY=1", 0, Socket::pack_sockaddr_un($ns));
  delete $ENV{NOTIFY_SOCKET};
}

sub frame {
  my ($t, $id, $data) = @_;
  $wbuf .= pack("a1NN", $t, $id, length $data) . $data;
}

sub nonblock { my $fh = shift; fcntl($fh, F_SETFL, fcntl($fh, F_GETFL, 0) | O_NONBLOCK) }

sub start {
  my ($id, $cmd) = @_;
  if (exists $st{$id} || keys(%st) >= $MAX_STREAMS) { frame("X", $id, "error refused"); return }
  my ($ir, $iw, $or, $ow, $er, $ew);
  unless (pipe($ir, $iw) && pipe($or, $ow) && pipe($er, $ew)) {
    frame("X", $id, "error pipe: $!");
    return;
  }
  my $pid = fork();
  if (!defined $pid) { frame("X", $id, "error fork: $!"); return }
  if ($pid == 0) {
    setpgrp(0, 0);
    $SIG{PIPE} = "DEFAULT";
    open(STDIN, "<&", $ir) && open(STDOUT, ">&", $ow) && open(STDERR, ">&", $ew)
      or exit 126;
    # Everything else this process holds is close-on-exec (perl's default above fd 2).
    my @pw = getpwuid($<);
    my ($user, $home, $shell) = ($pw[0] // "root", $pw[7] || "/", $pw[8] || "/bin/sh");
    %ENV = (HOME => $home, USER => $user, LOGNAME => $user, SHELL => $shell,
            PATH => $PATH, MAIL => "/var/mail/$user");
    chdir($home) or chdir("/");
    exec { $shell } $shell, "-c", $cmd;
    print STDERR "banger-agent: cannot run $shell: $!\n";
    exit 127;
  }
  setpgrp($pid, $pid);  # here too: a signal sent before the child ran its own finds it
  close $ir; close $ow; close $ew;
  nonblock($_) for ($iw, $or, $er);
  $st{$id} = {pid => $pid, in => $iw, out => $or, err => $er, inbuf => "", took => 0,
              eof => 0};
}

sub end_all {  # the host is gone or starts over: its commands go (as with an ssh hang-up)
  for my $s (values %st) {
    kill("HUP", -$s->{pid});
    kill("CONT", -$s->{pid});
    close($_) for grep { defined } @{$s}{qw(in out err)};
    $orphans++ unless defined $s->{status};
  }
  %st = ();
  @ready = ();
  $wbuf = "";
}

sub ident_ok {
  my $gen = shift;
  my $status = "";
  if (open(my $f, "<", "/run/banger-ident")) { $status = <$f> // ""; chomp $status }
  return undef if $gen ne "" && $status !~ /\Agen=\Q$gen\E /;
  for my $t ("/proc/net/tcp", "/proc/net/tcp6") {
    open(my $f, "<", $t) or next;
    while (<$f>) {  # local address :0016 (22), state 0A (LISTEN)
      next unless /\A\s*\d+:\s+[0-9A-F]+:0016\s+[0-9A-F]+:[0-9A-F]+\s+0A\s/;
      return "ok " . substr($status, 0, 200);
    }
  }
  return undef;
}

sub refuse {  # end everything, and take nothing more until the host end reconnects
  end_all();
  ($rbuf, $hello, $broken) = ("", 0, 1);
}

sub input {
  while (length($rbuf) >= 9) {
    my ($t, $id, $len) = unpack("a1NN", $rbuf);
    if ($len > $MAX) { refuse(); return }  # not banger's framing
    last if length($rbuf) < 9 + $len;
    my $data = substr($rbuf, 9, $len);
    substr($rbuf, 0, 9 + $len) = "";
    if ($t eq "H") {
      end_all();
      $hello = 1;
      $wbuf = $SYNC;  # whatever was half-sent before, the host finds the answer after this
      frame("H", 0, substr($data, 0, 64) . " banger-agent @PROTOCOL@");
      next;
    }
    next unless $hello;  # what an earlier connection left unread
    my $s = $st{$id};
    if ($t eq "E") { start($id, $data) }
    elsif ($t eq "I") {
      next unless $s && $s->{in};
      $s->{inbuf} .= $data;
      # More than the window allows: not banger's host.
      if (length($s->{inbuf}) > 2 * $WINDOW) { refuse(); return }
    }
    elsif ($t eq "C") { $s->{eof} = 1 if $s }
    elsif ($t eq "K") { kill($data, -$s->{pid}) if $s && $data =~ /\A[1-9][0-9]?\z/ }
    elsif ($t eq "W") { push @ready, [$id, $data, time + 120] }
  }
}

sub disconnected {
  end_all();
  ($rbuf, $connected, $hello, $broken) = ("", 0, 0, 0);
}

while (1) {
  my ($rin, $win) = ("", "");
  for my $s (values %st) {
    if ($s->{in} && length $s->{inbuf}) { vec($win, fileno($s->{in}), 1) = 1 }
    if (length($wbuf) < $HIGH) {
      for my $k ("out", "err") { vec($rin, fileno($s->{$k}), 1) = 1 if $s->{$k} }
    }
  }
  if ($connected) {
    vec($rin, fileno($port), 1) = 1;
    vec($win, fileno($port), 1) = 1 if length $wbuf;
  } elsif ($real) {
    # Nobody at the host end: a read returns at once (end of file), but a write would
    # block, so the port turns writable exactly when the host connects.
    vec($win, fileno($port), 1) = 1;
  }
  my $reaping = grep { !$_->{out} && !$_->{err} } values %st;
  my $timeout = (@ready || $reaping) ? 0.02 : $orphans ? 1
                : ($connected || $real) ? undef : 1;
  my $n = select(my $r = $rin, my $w = $win, undef, $timeout);
  if ($n < 0) { $r = ""; $w = "" }
  if ((!$connected && ($n > 0 || !$real)) || vec($r, fileno($port), 1)) {
    my $got = sysread($port, $rbuf, 65536, length $rbuf);
    if (defined $got && $got == 0) {
      disconnected() if $connected;
    } elsif (defined $got || $!{EAGAIN}) {
      $connected = 1;
      if ($broken) { $rbuf = "" } else { input() }
    } else {
      disconnected();
    }
  }
  for my $id (keys %st) {
    my $s = $st{$id};
    for my $k ("out", "err") {
      my $fh = $s->{$k} or next;
      next unless vec($r, fileno($fh), 1);
      my $got = sysread($fh, my $buf, 32768);
      if ($got) { frame($k eq "out" ? "O" : "R", $id, $buf) }
      elsif (defined $got || !$!{EAGAIN}) { close $fh; $s->{$k} = undef }
    }
    if ($s->{in} && length $s->{inbuf} && vec($w, fileno($s->{in}), 1)) {
      my $put = syswrite($s->{in}, $s->{inbuf});
      if (defined $put) { substr($s->{inbuf}, 0, $put) = ""; $s->{took} += $put }
      elsif (!$!{EAGAIN}) {
        $s->{took} += length $s->{inbuf};
        $s->{inbuf} = ""; close $s->{in}; $s->{in} = undef;
      }
      # What the command took frees the host's window.
      if ($s->{took} >= 16384 || ($s->{took} && !length $s->{inbuf})) {
        frame("A", $id, $s->{took});
        $s->{took} = 0;
      }
    }
    if ($s->{in} && $s->{eof} && !length $s->{inbuf}) { close $s->{in}; $s->{in} = undef }
  }
  while ((my $pid = waitpid(-1, 1)) > 0) {  # WNOHANG
    my $status = $?;
    my ($mine) = grep { $_->{pid} == $pid } values %st;
    if ($mine) { $mine->{status} = $status } elsif ($orphans) { $orphans-- }
  }
  for my $id (keys %st) {
    my $s = $st{$id};
    next if $s->{out} || $s->{err} || !defined $s->{status};
    my $x = $s->{status};
    frame("X", $id, ($x & 127) ? "signal " . ($x & 127) : "exit " . ($x >> 8));
    close $s->{in} if $s->{in};
    delete $st{$id};
  }
  @ready = grep {
    my ($id, $gen, $until) = @$_;
    my $ok = ident_ok($gen);
    frame("W", $id, $ok) if defined $ok;
    frame("W", $id, "timeout") if !defined $ok && time > $until;
    !defined $ok && time <= $until;
  } @ready;
  if ($connected && length $wbuf) {
    my $put = syswrite($port, $wbuf);
    if (defined $put) { substr($wbuf, 0, $put) = "" }
    elsif (!$!{EAGAIN}) { disconnected() }
  }
}
"""

GUEST_AGENT_UNIT = """[Unit]
Description=banger guest agent (the host's commands, without an SSH login)
DefaultDependencies=no
After=banger-init.service
# Ready (its port open) before sshd starts: the host, told by the console that sshd has
# started, then finds the agent there too.
Before=ssh.service shutdown.target
Conflicts=shutdown.target

[Service]
Type=notify
NotifyAccess=main
ExecStart=/usr/local/sbin/banger-agent
Restart=on-failure
# The commands it runs get what sshd's sessions get (see ssh.service's drop-in).
CPUWeight=1000

[Install]
WantedBy=multi-user.target
"""


def agent_script() -> str:
    """``banger-agent`` with banger's constants filled in."""
    return (GUEST_AGENT.replace("@PORT@", PORT_NAME).replace("@MAX@", str(MAX_PAYLOAD))
            .replace("@STREAMS@", str(MAX_STREAMS)).replace("@PROTOCOL@", str(PROTOCOL))
            .replace("@LISTENING@", GUEST_LISTENING).replace("@WINDOW@", str(WINDOW)))
