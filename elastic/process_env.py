"""The environment variables ecpt itself sets for its processes, each named once here, this node's identity, and
the run-directory files launchers and workers both name.

Kept apart from ``elastic.world`` (which imports torch) because the launcher reads these names too, and every
``ecpt`` start, ``ecpt --help`` included, must not pay for importing torch. Workers read them.
"""

from __future__ import annotations

import os
import socket

NODE_ID_ENV = "ECPT_NODE_ID"
"""This node's identity, set per agent by ``ecpt train --node-id`` (several simulated nodes on one machine);
unset means the hostname. It names the node's own L0 memory directory and is what ``kill node`` faults target."""
AGENT_PID_ENV = "ECPT_AGENT_PID"
"""Set by ``launch.agent``: the elastic agent's pid (a worker's parent is the fork server, not the agent)."""
PROCESS_STARTED_ENV = "ECPT_PROCESS_STARTED"
"""Unix time at which this worker process started (set once, on entry), so start-up cost can be reported."""


def node_id(env: dict[str, str] | None = None) -> str:
    """Stable identity of this node's memory: ``ECPT_NODE_ID`` if the launcher set it, else the hostname."""
    env = os.environ if env is None else env
    return env.get(NODE_ID_ENV) or os.uname().nodename


REPLICA_INDEX_ENV = "ECPT_REPLICA_INDEX"
"""replicas mode: this replica group's fixed index (0, 1, ...), set per agent by the launcher. It names the replica
to the quorum coordinator, in logs and in fault plans ('kill rank 1' kills replica 1); the quorum rank may differ."""
REPLICA_SLOT_ENV = "ECPT_REPLICA_SLOT"
"""replicas mode: the replica group's position among those the launcher started on this machine (0, 1, ...), its
offset from a fixed metrics.port, as the local rank is in the restart mode (every replica is local rank 0)."""
LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"
"""replicas mode: the quorum coordinator's address (torchft's own variable name), set by the launcher."""
SHARED_MACHINE_ENV = "ECPT_REPLICAS_SHARE_MACHINE"
"""replicas mode: how many replica groups the launcher started on this machine (unset when train.threads_per_worker
is set), so a replica sizes its torch threads to the cores per replica (each one-worker replica would otherwise
take every core)."""
ADVERTISE_HOST_ENV = "ECPT_ADVERTISE_HOST"
"""replicas mode: the host name or address other replica groups reach this one at (its store for the cross-replica
process group, its quorum manager and its heal server). The local launcher sets 127.0.0.1; on a cluster it is the
node's hostname unless set (on Kubernetes, the pod IP: a pod's own hostname does not resolve in other pods)."""


def advertise_host(env: dict[str, str] | None = None) -> str:
    """Where peers reach this replica group: ``ECPT_ADVERTISE_HOST`` if the launcher set it, else the hostname."""
    env = os.environ if env is None else env
    return env.get(ADVERTISE_HOST_ENV) or socket.gethostname()


COORDINATOR_FILE = "lighthouse.json"
"""``<run_dir>/lighthouse.json``: a local replicas-mode run's coordinator address and pid (fault plans, ``ecpt chaos``
and tests read it)."""
