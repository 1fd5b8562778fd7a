"""Two "nodes" on one machine for the DeepSpeed hostfile path: 127.0.0.1 and 127.0.0.2 served by a private sshd.

The sshd runs from a temporary folder with its own config, host key and authorized key (loopback addresses
only, a free port, key login only, root by key as in CI); nothing in ~/.ssh or /etc/ssh is read or changed.
The client side is an ``ssh`` wrapper put first on PATH that adds ``-F <our ssh_config>`` (the identity,
no known-hosts file): DeepSpeed's ssh check and pdsh both run ``ssh`` from PATH, so the launcher's own
default path (ssh check, pdsh, ``--ssh_port``) runs unchanged, as it would with a user's ~/.ssh/config.

Anything that stops the two nodes from existing (a missing sshd / ssh / ssh-keygen / pdsh, pdsh without its
ssh module, 127.0.0.2 not on loopback, sshd refusing to start or to let us in) raises ``NodesUnavailable``
with the exact reason; the tests turn it into a skip.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Dict, List, Optional

from tests.distributed import free_port

ADDRS = ("127.0.0.1", "127.0.0.2")
# sshd lives in sbin, which a non-login PATH may lack
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class NodesUnavailable(Exception):
    """The loopback nodes cannot be set up here (the reason says exactly why)."""


def which(name: str) -> Optional[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    return shutil.which(name, path=path)


def missing_tools() -> Optional[str]:
    """Why the loopback nodes cannot exist on this machine, or None."""
    if not os.path.isdir("/proc"):
        return "not Linux (needs /proc and 127.0.0.0/8 on loopback)"
    need = {"sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client", "pdsh": "pdsh"}
    absent = [f"{tool} (Debian package {pkg})" for tool, pkg in need.items() if which(tool) is None]
    if absent:
        return ("not installed: " + ", ".join(absent)
                + "; `apt-get install -y openssh-server pdsh` (what .ci/run tries, best effort, as root)")
    r = subprocess.run([which("pdsh"), "-V"], capture_output=True, text=True)
    out = r.stdout + r.stderr   # "rcmd modules: ssh,rsh,exec (default: rsh)"
    mods = next((l.split(":", 1)[1].split("(")[0] for l in out.splitlines() if l.startswith("rcmd modules")), "")
    if "ssh" not in [m.strip() for m in mods.split(",")]:
        return f"pdsh has no ssh rcmd module (`pdsh -V`: {out.strip()!r})"
    for addr in ADDRS:
        try:
            with socket.socket() as s:
                s.bind((addr, 0))
        except OSError as e:
            return f"cannot bind {addr} (127.0.0.0/8 not all on loopback here): {e}"
    return None


def descendants(pid: int) -> List[int]:
    """Every live process below ``pid`` (read from /proc), parents before children."""
    children: Dict[int, List[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class LoopbackNodes:
    """A private sshd on ADDRS plus the hostfile, ssh wrapper and env file a DeepSpeed multi-node launch needs."""

    def __init__(self, workdir: str, slots: int = 1, forward_env: Optional[Dict[str, str]] = None,
                 aliases: Optional[Dict[str, str]] = None, own_address: bool = False):
        """``aliases``: host names (e.g. SLURM node names) that ssh resolves to one of ADDRS, on our port.
        ``own_address``: in our ssh sessions ``hostname -I`` prints the loopback address the session came in
        on (each node reports its own address, as a real node does). DeepSpeed's runner without
        ``--master_addr`` takes the first node's ``hostname -I``; this machine's would be a non-loopback one."""
        self.dir = os.path.abspath(workdir)
        self.aliases = dict(aliases or {})
        self.own_address = own_address
        os.makedirs(self.dir, exist_ok=True)
        self.slots = slots
        self.forward_env = dict(forward_env or {})
        self.port: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None
        self.hostfile = os.path.join(self.dir, "hostfile")
        self.env_file = os.path.join(self.dir, "deepspeed_env")
        self.bin = os.path.join(self.dir, "bin")
        self.log = os.path.join(self.dir, "sshd.log")

    # ---- set-up ------------------------------------------------------------------------------
    def start(self, attempts: int = 3) -> "LoopbackNodes":
        reason = missing_tools()
        if reason:
            raise NodesUnavailable(reason)
        self._privsep_dir()
        self._keys()
        err = ""
        for _ in range(attempts):  # a port taken between choosing it and sshd binding it: choose again
            self.port = free_port()
            err = self._start_sshd()
            if not err:
                break
        else:
            raise NodesUnavailable(err)
        self._client_files()
        err = self._wait_reachable()
        if err:
            self.stop()
            raise NodesUnavailable(err)
        return self

    def _privsep_dir(self) -> None:
        # sshd started as root insists on its privilege-separation directory, which Debian's service unit
        # (RuntimeDirectory=sshd) normally creates; without a running service it is absent.
        if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
            try:
                os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
            except OSError as e:
                raise NodesUnavailable(f"sshd as root needs /run/sshd, which could not be created: {e}")

    def _keys(self) -> None:
        for name in ("host_key", "client_key"):
            path = os.path.join(self.dir, name)
            if not os.path.exists(path):
                r = subprocess.run([which("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", "megaslm-test",
                                    "-f", path], capture_output=True, text=True)
                if r.returncode:
                    raise NodesUnavailable(f"ssh-keygen failed (rc {r.returncode}): {r.stderr.strip()}")
        shutil.copyfile(os.path.join(self.dir, "client_key.pub"), os.path.join(self.dir, "authorized_keys"))

    def _start_sshd(self) -> str:
        """Start sshd on self.port; '' when it is listening, else why not."""
        cfg = os.path.join(self.dir, "sshd_config")
        with open(cfg, "w") as f:
            f.write("\n".join([
                f"Port {self.port}", *(f"ListenAddress {a}" for a in ADDRS),
                f"HostKey {self.dir}/host_key", f"AuthorizedKeysFile {self.dir}/authorized_keys",
                f"PidFile {self.dir}/sshd.pid", "UsePAM no", "StrictModes no",
                "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "PasswordAuthentication no",
                "KbdInteractiveAuthentication no", "X11Forwarding no", "AllowTcpForwarding no",
                "PrintMotd no", "LogLevel VERBOSE", *self._session_path(), ""]))
        sshd = which("sshd")
        r = subprocess.run([sshd, "-t", "-f", cfg], capture_output=True, text=True)
        if r.returncode:
            return f"`sshd -t` rejects the test's config (rc {r.returncode}): {r.stderr.strip()}"
        log = open(self.log, "w")   # this attempt's log only
        self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", cfg], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.proc.poll() is not None:
                rc, self.proc = self.proc.returncode, None
                return f"sshd exited with rc {rc}: {self.log_tail()}"
            log = self.log_tail(10**6)
            if all(f"Server listening on {a} port {self.port}." in log for a in ADDRS):
                return ""
            if f"port {self.port}" in log and "Bind to port" in log:   # one address taken: sshd carries on
                break
            time.sleep(0.05)
        self.stop()
        return f"sshd did not listen on {' and '.join(ADDRS)} port {self.port}: {self.log_tail()}"

    def _session_path(self) -> List[str]:
        if not self.own_address:
            return []
        real = which("hostname")
        if real is None:
            raise NodesUnavailable("`hostname` not found (Debian package hostname)")
        shim_dir = os.path.join(self.dir, "session_bin")
        os.makedirs(shim_dir, exist_ok=True)
        shim = os.path.join(shim_dir, "hostname")
        with open(shim, "w") as f:   # SSH_CONNECTION = client addr, client port, server addr, server port
            f.write(f'#!/bin/sh\nif [ "$*" = "-I" ]; then set -- $SSH_CONNECTION; echo "$3"; exit 0; fi\n'
                    f'exec {real} "$@"\n')
        os.chmod(shim, 0o755)
        return [f"SetEnv PATH={shim_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]

    def _client_files(self) -> None:
        ssh_cfg = os.path.join(self.dir, "ssh_config")
        with open(ssh_cfg, "w") as f:
            f.write("\n".join([
                *(f"Host {name}\n  HostName {addr}\n  Port {self.port}" for name, addr in self.aliases.items()),
                "Host *", f"  IdentityFile {self.dir}/client_key", "  IdentitiesOnly yes",
                "  StrictHostKeyChecking no", "  UserKnownHostsFile /dev/null", "  BatchMode yes",
                "  ConnectTimeout 10", "  LogLevel ERROR", ""]))
        os.makedirs(self.bin, exist_ok=True)
        wrapper = os.path.join(self.bin, "ssh")
        with open(wrapper, "w") as f:
            f.write(f'#!/bin/sh\nexec {which("ssh")} -F {ssh_cfg} "$@"\n')
        os.chmod(wrapper, 0o755)
        with open(self.hostfile, "w") as f:
            f.write("".join(f"{a} slots={self.slots}\n" for a in ADDRS))
        # DeepSpeed's runner exports only PYTHON*/MLFLOW*/MV2*/UCX* (+ the accelerator's, e.g. NCCL* on CUDA)
        # to the remote shell; anything else a rank needs goes in a .deepspeed_env file (KEY=VALUE lines),
        # looked up in ~ and the current directory, or named by DS_ENV_FILE (an absolute path works).
        with open(self.env_file, "w") as f:
            f.write("".join(f"{k}={v}\n" for k, v in self.forward_env.items()))

    def _wait_reachable(self) -> str:
        for addr in ADDRS:
            r = subprocess.run([os.path.join(self.bin, "ssh"), "-p", str(self.port), addr, "echo", "ok"],
                               capture_output=True, text=True, timeout=30)
            if r.returncode or r.stdout.strip() != "ok":
                return (f"ssh to {addr}:{self.port} with the test's key failed (rc {r.returncode}): "
                        f"{r.stderr.strip()}; sshd log: {self.log_tail()}")
        return ""

    # ---- use -----------------------------------------------------------------------------------
    def launcher_env(self, base: Dict[str, str]) -> Dict[str, str]:
        env = dict(base)
        env["PATH"] = self.bin + os.pathsep + env.get("PATH", "")
        env["DS_ENV_FILE"] = self.env_file
        return env

    def launcher_args(self) -> List[str]:
        return ["--hostfile", self.hostfile, "--ssh_port", str(self.port), "--master_addr", ADDRS[0]]

    def log_tail(self, n: int = 1500) -> str:
        try:
            with open(self.log) as f:
                return f.read()[-n:].strip()
        except OSError:
            return ""

    def kill_sessions(self) -> None:
        """SIGKILL, by pid, whatever still runs under our sshd (the remote launchers and their ranks)."""
        if self.proc is None:
            return
        for pid in descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.proc is None:
            return
        self.kill_sessions()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
