"""Per-step fault tolerance ("replicas" mode, ``launch.fault_tolerance = "replicas"``) on torchft.

Each replica group is its own job (its own agent); a torchft Lighthouse (``launch.replicas_launch`` starts it, or
``ecpt lighthouse``) forms a quorum at every step. One step, on every replica (``elastic.ft.replica``):

    quorum            Manager.start_quorum (synchronous): membership, this replica's quorum rank r of n; the
                      process group is reconfigured in place when membership changed; a replica behind the
                      quorum's newest step first heals from a live peer (``elastic.ft.state``)
    split             step s's global batch over the n participants, ``rank_batch(s, G, mb, r, n)``: the same
                      G samples whatever n, each sample used once
    reduce            one SUM all-reduce of [gradients, loss sum, stop flag] over the quorum (losses are already
                      divided by G, so the SUM is the global-batch mean: never torchft's default AVG)
    commit            Manager.should_commit: only a step whose all-reduce completed is applied; otherwise the
                      step is discarded (no update at all) and runs again with the next quorum
    checkpoint        only the quorum's rank 0 saves (``elastic.ft.replica``: every committed replica holds the
                      same full state, so one writer is a complete checkpoint and no collective spans replicas)

This package is the only place that talks to torchft; the trainer calls ``ReplicaStepper`` through one hook.
"""
