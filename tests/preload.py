"""Stage ranks forked from a preloaded interpreter: the suite's launches without ~11 s of imports each.

A stage rank spends most of a tiny-model test importing torch, Megatron, ModelOpt and transformers
(``python -X importtime``: ~11 s of CPU per process). ``run_stage`` (tests/launch.py) still launches the
real ``torchrun``, and torchrun still starts one real process per rank, but that process is this file as
a client: it hands its argv, environment, working directory and standard streams (the descriptors
themselves) to a server that imported those libraries once, and the server forks the rank from itself.
The fork sets the environment, streams, ``sys.argv`` and ``sys.path[0]`` as a fresh ``python -u script``
would, then runs the stage script as ``__main__``.

What a fork does not give, and what takes its place:
- Modules import once, in the server, in the server's environment. So the server only serves a rank
  whose environment equals its own up to the variables read at run time (``RUNTIME_KEYS``,
  ``RUNTIME_PREFIXES``); any other difference, and the client runs ``python -u script`` itself.
  Only what every stage imports anyway is preloaded, in the order a stage imports it (``serve``).
- Every fork of one server shares its string-hash seed. Local rank r goes to server ``r % SLOTS``,
  each with its own seed, so the ranks of a job still iterate sets in different orders, as fresh
  interpreters do. ``random`` and NumPy are reseeded from the OS in each fork.
- Signals torchrun sends the client (SIGTERM, SIGINT, ...) are forwarded to the rank. A client that
  dies (SIGKILL from torchrun, or the OOM killer) closes its connection, and the rank then kills its
  own process group. The rank's exit status (a code, or the signal that killed it) becomes the
  client's, so torchrun sees what it would have seen.

``HYBRIDQUANT_TEST_PRELOAD=0`` runs every rank as a fresh interpreter instead.

Server: ``python -u tests/preload.py --serve SOCKET``. Client (torchrun's worker): ``tests/preload.py
SCRIPT ARGS...`` with ``HQ_PRELOAD_SOCKETS`` (one socket per slot, ``os.pathsep``-separated). Only the
standard library is imported before a client connects.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

SOCKETS_ENV = "HQ_PRELOAD_SOCKETS"
SLOTS = 2
# What every stage imports at its top (quantize, export, evaluate, generate, autoquant, qad).
PRELOAD = ("hydra", "omegaconf", "transformers", "hybridquant.stages.quantize", "hybridquant.stages.export",
           "hybridquant.stages.evaluate", "hybridquant.stages.generate", "hybridquant.stages.autoquant",
           "hybridquant.stages.qad")
# Read at run time, never at import: these may differ between the server and the ranks it serves
# (NVTE_*: megatron's LanguageModule sets and checks the attention-backend flags when it is built).
RUNTIME_KEYS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING", SOCKETS_ENV, "SHLVL", "_"}
RUNTIME_PREFIXES = ("TORCHELASTIC_", "HYBRIDQUANT_", "PYTEST_", "HQ_", "NVTE_")
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def comparable(env: dict) -> dict:
    """``env`` without the variables read at run time."""
    return {k: v for k, v in env.items() if k not in RUNTIME_KEYS and not k.startswith(RUNTIME_PREFIXES)}


# -- client (torchrun's worker process) -------------------------------------------------------------------

def _fresh(argv: list[str]) -> None:
    os.execv(sys.executable, [sys.executable, "-u", *argv])


def client(argv: list[str]) -> None:
    sockets = os.environ.get(SOCKETS_ENV, "").split(os.pathsep)
    path = sockets[int(os.environ.get("LOCAL_RANK", "0")) % len(sockets)]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        _fresh(argv)
    payload = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    socket.send_fds(conn, [struct.pack("!Q", len(payload))], [0, 1, 2])
    conn.sendall(payload)
    replies = conn.makefile("r")
    first = replies.readline().split()
    if first[:1] != ["pid"]:  # refused: an environment the preloaded modules did not see
        conn.close()
        _fresh(argv)
    pid = int(first[1])
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, _frame: os.kill(pid, signum))
    kind, _, value = replies.readline().partition(" ")
    if kind == "signal":
        sig = int(value)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be handled, so need no reset
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(int(value) if kind == "exit" else 1)


# -- server -----------------------------------------------------------------------------------------------

def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("client closed the connection")
        data += chunk
    return data


def _rank(conn: socket.socket, inherited: list[socket.socket], fds: list[int], request: dict,
          imported_env: tuple[dict, set]) -> None:
    """In the fork: become ``python -u SCRIPT ARGS`` as the client would have started it, and run it."""
    import random
    import runpy
    import threading

    for other in inherited:  # the listener and the other ranks' connections
        other.close()
    os.setpgid(0, 0)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    set_by_imports, unset_by_imports = imported_env  # as the same imports would have changed it
    os.environ.update(set_by_imports)
    for key in unset_by_imports:
        os.environ.pop(key, None)
    script, *_ = request["argv"]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.realpath(script))
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()

    def orphaned() -> None:  # the client is gone: end this rank and whatever it started
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=orphaned, daemon=True).start()
    runpy.run_path(script, run_name="__main__")
    sys.exit(0)


def _thread_names() -> list[str]:
    """The comm name of every thread of this process, the main thread first."""
    tasks = sorted(os.listdir("/proc/self/task"), key=lambda tid: tid != str(os.getpid()))
    return [open(f"/proc/self/task/{tid}/comm").read().strip() for tid in tasks]


def serve(path: str) -> None:
    import gc
    import importlib
    import select

    started_env = dict(os.environ)
    for name in PRELOAD:
        importlib.import_module(name)
    # Then what every stage does first when it builds a model (hybridquant.model), in the same order:
    # the CPU fixes (they must precede megatron's Mamba modules), then megatron-bridge, megatron-core and
    # ModelOpt. So the modules these import see what they see in a fresh rank.
    from hybridquant.compat import cpu
    from hybridquant.compat.bridge_import import import_auto_bridge

    cpu.apply()
    import_auto_bridge()
    # Forking a process with other threads can copy a lock one of them holds. jemalloc's purging thread
    # (started by pyarrow's allocator) is the exception: jemalloc's own fork handlers take its locks.
    others = [name for name in _thread_names() if name != "jemalloc_bg_thd"][1:]
    if others:
        sys.exit(f"preload: threads {others} run after the imports; a fork would not be safe")
    own_env = comparable(started_env)
    imported_env = ({k: v for k, v in os.environ.items() if started_env.get(k) != v},
                    started_env.keys() - os.environ.keys())
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # clients see the socket only once it accepts
    gc.freeze()  # keep the preloaded objects' pages shared with the forks
    children: dict[int, socket.socket] = {}
    while os.getppid() == parent:  # until the test process that started this server is gone
        readable, _, _ = select.select([listener], [], [], 0.2)
        _reap(children)
        accepted = _accept(listener, own_env) if readable else None
        if accepted is None:
            continue
        conn, fds, request = accepted
        pid = os.fork()
        if pid == 0:
            _rank(conn, [listener, *children.values()], fds, request, imported_env)
        for fd in fds:
            os.close(fd)
        children[pid] = conn
        try:
            conn.sendall(f"pid {pid}\n".encode())
        except OSError:  # the client is gone already: the rank sees its connection close and ends
            pass
    os.unlink(path)


def _accept(listener: socket.socket, own_env: dict):
    """The next client's ``(connection, its stdin/stdout/stderr descriptors, request)``, or None when
    it is refused (another environment) or gone before its request arrived."""
    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        header, fds, _, _ = socket.recv_fds(conn, 8, 3)
        request = json.loads(_recv_exactly(conn, struct.unpack("!Q", header)[0]))
        theirs = comparable(request["env"])
        if theirs == own_env and len(fds) == 3:
            return conn, fds, request
        print(f"preload: {request['argv'][0]} gets a fresh interpreter: its environment differs in "
              f"{sorted(k for k in own_env.keys() | theirs.keys() if own_env.get(k) != theirs.get(k))}", flush=True)
        conn.sendall(b"refused\n")
    except (OSError, ValueError, struct.error) as exc:
        print(f"preload: a client was dropped: {exc}", flush=True)
    for fd in fds:
        os.close(fd)
    conn.close()
    return None


def _reap(children: dict[int, socket.socket]) -> None:
    """Send each rank that ended its exit status (a code, or the signal that killed it) and close it."""
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if not pid:
            return
        conn = children.pop(pid)
        reply = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.waitstatus_to_exitcode(status)}"
        try:
            os.killpg(pid, signal.SIGKILL)  # helpers the rank left running, so that none outlives its job
        except ProcessLookupError:
            pass
        try:
            conn.sendall(f"{reply}\n".encode())
        except OSError:
            pass
        conn.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2])
    else:
        client(sys.argv[1:])
