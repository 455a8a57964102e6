"""Multi-process runs: reaching the coordinator, agreeing on the config, noticing a lost
process."""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

# Config keys that may differ between processes: each host may keep its data elsewhere.
HOST_LOCAL_KEYS = ("data.data_dir", "data.tfds_data_dir")

EXIT_PROCESS_LOST = 75
"""Exit status of a process that stops because another process of its run was lost (75,
`EX_TEMPFAIL`: start all processes again to resume)."""
# Seconds without a heartbeat after which `ProcessWatch` declares a process lost.
_settings = {"heartbeat_timeout": 60.0}


def _wait_for(address: str, timeout: float) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator address {address!r} must be 'host:port'.")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"the coordinator at {address} cannot be reached (waited {timeout:g} s: {e}). "
                    "Start process 0 first (it runs the coordinator) and check the address, the "
                    "port and any firewall between the hosts."
                ) from e
            time.sleep(0.5)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout: float = 300.0,
    heartbeat_timeout: float = 60.0,
) -> None:
    """`jax.distributed.initialize`, failing with a clear error when it cannot start.

    With no arguments JAX detects the cluster (SLURM, Cloud TPU, Kubernetes, Open MPI) or
    reads `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`. A process
    other than 0 first waits up to `timeout` seconds for the coordinator's port to open and
    raises `ConnectionError` naming the address if it never does (JAX itself would abort the
    process).

    During `ff.train`, a process that sends no heartbeat for `heartbeat_timeout` seconds is
    lost: every other process then exits with status `EXIT_PROCESS_LOST` (75) and a one-line
    error naming it, the step and the checkpoint to resume from. JAX's own heartbeat check,
    which aborts without saying so, is set to twice that (at least 100 s).
    """
    if isinstance(heartbeat_timeout, bool) or not isinstance(heartbeat_timeout, (int, float)):
        raise TypeError(f"heartbeat_timeout={heartbeat_timeout!r} must be a number of seconds.")
    if not 0 < heartbeat_timeout < math.inf:
        raise ValueError(f"heartbeat_timeout={heartbeat_timeout} must be > 0 seconds.")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
    if process_id is not None and num_processes is not None:
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} is not in [0, {num_processes}).")
    if coordinator_address is not None and process_id not in (None, 0):
        _wait_for(coordinator_address, timeout)
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        initialization_timeout=int(max(timeout, 1)),
        # JAX's own check aborts every process without naming the lost one: a later backstop.
        heartbeat_timeout_seconds=max(100, math.ceil(2 * heartbeat_timeout)),
    )
    _settings["heartbeat_timeout"] = float(heartbeat_timeout)


class ConfigMismatchError(ValueError):
    """The processes of one run were started with different configs."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(ours: dict, theirs: dict) -> list[str]:
    """`key: ours != theirs` for every flattened key that differs (or exists in one only)."""
    a, b = _flatten(ours), _flatten(theirs)
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, missing), b.get(key, missing)
        if x != y:
            show = lambda v: "(missing)" if v is missing else repr(v)  # noqa: E731
            out.append(f"{key}: {show(x)} != {show(y)}")
    return out


def _canonical(config: dict, ignore) -> bytes:
    flat = {k: v for k, v in _flatten(config).items() if k not in ignore}
    return json.dumps(flat, sort_keys=True, default=str).encode()


def check_processes_agree(
    config: dict,
    *,
    ignore: tuple[str, ...] = HOST_LOCAL_KEYS,
    subject: str = "config",
    hint: str = "start every process with the same config",
) -> None:
    """Raise `ConfigMismatchError` on every process unless all processes hold the same config.

    Keys in `ignore` may differ. A process whose config differs from process 0's names the
    differing keys; process 0 names the processes that differ. One process: no-op. `subject`
    and `hint` word the error for other agreements (e.g. the step to resume from).
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    blob = _canonical(config, ignore)
    digest = np.frombuffer(hashlib.sha256(blob).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    differ = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
    if not differ:
        return
    # Everyone takes part in sending process 0's config, then each says what differs.
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(blob))))
    padded = np.zeros(size, np.uint8)
    if jax.process_index() == 0:
        padded[:] = np.frombuffer(blob, np.uint8)
    ref = bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded)).astype(np.uint8))
    me = jax.process_index()
    if me == 0:
        raise ConfigMismatchError(
            f"processes {differ} have a different {subject} than process 0 "
            f"(each of them lists the differences); {hint}."
        )
    if me in differ:
        diffs = config_differences(json.loads(blob), json.loads(ref))
        raise ConfigMismatchError(
            f"process {me}'s {subject} differs from process 0's: " + "; ".join(diffs) + f"; {hint}."
        )
    raise ConfigMismatchError(
        f"processes {differ} have a different {subject} than process 0; this process ({me}) "
        f"agrees with process 0; {hint}."
    )


# XLA's status codes, which start the message of a failed computation or collective (gloo's
# come as a `JaxRuntimeError` or, from some calls, a `ValueError`).
_STATUS_CODES = tuple(
    f"{code}:"
    for code in ("UNKNOWN", "INTERNAL", "UNAVAILABLE", "ABORTED", "CANCELLED", "DEADLINE_EXCEEDED")
)


def _runtime_failure(exc: BaseException) -> bool:
    if isinstance(exc, jax.errors.JaxRuntimeError):
        return True
    return isinstance(exc, ValueError) and str(exc).startswith(_STATUS_CODES)


class ProcessWatch:
    """While the processes of a run train: exit at once, naming the lost process, when
    another process stops responding.

    A thread in each process writes a heartbeat to the coordinator's key-value store every
    `interval` seconds and reads everyone's. A process whose heartbeat has not changed for
    `timeout` seconds (default: `initialize_distributed`'s `heartbeat_timeout`), or a
    coordinator that cannot be reached, is lost. Every other process also holds a TCP
    connection to process 0, whose closing tells at once that process 0 is gone (before JAX's
    client, which aborts the process, in most cases). Then this process writes one line to stderr
    (which process, at which step, the last checkpoint, how to resume) and exits with status
    `EXIT_PROCESS_LOST`, since its collectives can never complete. An XLA error (e.g. a
    collective that failed) leaving the `with` block first waits up to `timeout` seconds
    for that verdict. One process: no-op.

    `state` is the training loop's progress (its `step`, read when reporting); `resumed` the
    step of the checkpoint it started from, `saved(step)` records each checkpoint since.
    """

    _runs = 0  # every process enters its watches in the same order: a shared key prefix

    def __init__(
        self,
        workdir: str | os.PathLike,
        state: dict,
        *,
        resumed: int | None = None,
        timeout: float | None = None,
        interval: float | None = None,
    ):
        self.workdir = Path(workdir)
        self.state = state
        self.resumed = resumed
        self.saves: list[int] = []
        self.timeout = _settings["heartbeat_timeout"] if timeout is None else float(timeout)
        self.interval = min(1.0, self.timeout / 5) if interval is None else float(interval)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reporting = threading.Lock()
        self._server: socket.socket | None = None

    def saved(self, step: int) -> None:
        """Record a checkpoint that resumes from `step` (process 0 writes it)."""
        self.saves.append(step)

    def last_checkpoint(self) -> int | None:
        """The step of the last checkpoint known to be on disk."""
        if jax.process_index() == 0:  # the writer
            return self.saves[-1] if self.saves else self.resumed
        # Process 0 starts the next step only after writing: a later completed step (which
        # needs every process) shows that the checkpoint is there.
        done = [s for s in self.saves if s < self.state["step"]]
        return max(done, default=self.resumed)

    def __enter__(self):
        if jax.process_count() == 1:
            return self
        from jax._src.distributed import global_state

        if global_state.client is None:  # not started through jax.distributed
            return self
        ProcessWatch._runs += 1
        self._prefix = f"fractal_field/watch/{ProcessWatch._runs}/"
        client = global_state.client
        if jax.process_index() == 0:
            self._server = socket.create_server(("", 0))
            self._server.settimeout(self.interval)
            self._held: list[socket.socket] = []
            client.key_value_set(self._prefix + "lifeline", str(self._server.getsockname()[1]))
            self._lifeline = threading.Thread(target=self._hold, daemon=True)
        else:
            host = global_state.coordinator_address.rpartition(":")[0].strip("[]")
            self._lifeline = threading.Thread(target=self._follow, args=(client, host), daemon=True)
        self._lifeline.start()
        self._thread = threading.Thread(
            target=self._run, args=(client,), name="ProcessWatch", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._thread is None:
            return
        if exc is not None and _runtime_failure(exc):
            # A failed collective: if a process was lost, the watch says so and exits.
            self._thread.join(self.timeout + 5 * self.interval + 5)
        self._stop.set()
        self._thread.join()
        if self._server is not None:
            self._close_lifeline()
        if exc_type is None:
            # Finished: the others no longer expect heartbeats from this process.
            from jax._src.distributed import global_state

            try:
                global_state.client.key_value_set(
                    self._prefix + str(jax.process_index()), "done", allow_overwrite=True
                )
            except jax.errors.JaxRuntimeError:
                pass  # the coordinator has gone: nobody is left to tell

    def _close_lifeline(self) -> None:
        """Process 0, leaving the watch: a goodbye on each connection, so that its closing is
        not taken for a loss."""
        self._lifeline.join()
        for conn in self._held:
            try:
                conn.sendall(b"b")
            except OSError:
                pass
            conn.close()
        self._server.close()

    def _hold(self) -> None:
        """Process 0: accept the other processes' connections and keep them open."""
        while not self._stop.is_set():
            try:
                self._held.append(self._server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    def _follow(self, client, host: str) -> None:
        """Another process: wait on a connection to process 0 until it closes."""
        try:
            port = int(client.blocking_key_value_get(self._prefix + "lifeline", 60_000))
            conn = socket.create_connection((host, port), timeout=self.timeout)
        except Exception:
            return  # e.g. a firewall in between: the heartbeats still tell
        with conn:
            conn.settimeout(None)
            try:
                goodbye = conn.recv(1) == b"b"
            except OSError:
                goodbye = False
        if not goodbye and not self._stop.is_set():
            self._lost(0, "its connection closed")

    def _lost(self, process: int, why: str) -> None:
        self._reporting.acquire()  # one message, from whichever thread notices first
        n = jax.process_count()
        who = f"process {process} of {n}" + (" (the coordinator)" if process == 0 else "")
        ckpt, step = self.workdir / "checkpoints" / "last.eqx", self.last_checkpoint()
        if step is None:
            where = f"there is no checkpoint in {self.workdir} yet; start all processes again"
        else:
            where = (
                f"the last checkpoint is step {step} ({ckpt}); start all processes again "
                "with the same command to resume"
            )
        msg = f"error: {who} stopped responding at step {self.state['step']} ({why}); {where}."
        os.write(2, f"\n{msg}\n".encode())
        # The collectives this process waits in can never complete: nothing to unwind.
        os._exit(EXIT_PROCESS_LOST)

    def _run(self, client) -> None:
        me, n = jax.process_index(), jax.process_count()
        seen: dict[int, str | None] = dict.fromkeys(range(n))
        changed = dict.fromkeys(range(n), time.monotonic())
        beat = 0
        while not self._stop.is_set():
            try:
                beat += 1
                client.key_value_set(self._prefix + str(me), str(beat), allow_overwrite=True)
                values = dict(client.key_value_dir_get(self._prefix))
                now = time.monotonic()
                for p in range(n):
                    value = values.get(self._prefix + str(p))
                    if p == me or value == "done":
                        continue
                    if value != seen[p]:
                        seen[p], changed[p] = value, now
                    elif now - changed[p] > self.timeout and not self._stop.is_set():
                        self._lost(p, f"no heartbeat for {self.timeout:g} s")
                # Waiting on the coordinator, so that its loss is noticed at once.
                client.blocking_key_value_get(self._prefix + "never", int(self.interval * 1e3))
            except Exception as e:
                if "DEADLINE_EXCEEDED" in str(e):
                    continue
                if me != 0 and not self._stop.is_set():
                    self._lost(0, "its connection failed")
                return
