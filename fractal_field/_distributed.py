"""Starting a multi-process run: reaching the coordinator, agreeing on the config."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from typing import Any

import jax
import numpy as np

# Config keys that may differ between processes: each host may keep its data elsewhere.
HOST_LOCAL_KEYS = ("data.data_dir", "data.tfds_data_dir")


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
) -> None:
    """`jax.distributed.initialize`, failing with a clear error when it cannot start.

    With no arguments JAX detects the cluster (SLURM, Cloud TPU, Kubernetes, Open MPI) or
    reads `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`. A process
    other than 0 first waits up to `timeout` seconds for the coordinator's port to open and
    raises `ConnectionError` naming the address if it never does (JAX itself would abort the
    process).
    """
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
    )


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
