"""Helpers shared by the tests, one concern per module (``pythonpath`` in pyproject.toml puts ``tests/`` on the path):

waiting       the one deadline poll on an observable condition
configs       tiny config dicts, the small text corpus, the TOML writer
processes     launching ranks and the `ecpt` command as real processes, with the environment they import from
faults        fault scenarios shared by the fault tests: losing and rejoining a node (with its time budget)
trajectory    what a run did: the surviving losses, the samples consumed, the world sizes it went through
ckpt_state    deterministic checkpoint tensors and layouts, and checking loaded values
ckpt_workers  checkpoint manager worker processes (also run as a script) and their results
commit_steps  the commit protocol driven step by step on one process, for tests of a level storage
packages      Debian packages installed on demand for the integration tests
slurm         a private single-node Slurm cluster
prometheus    Prometheus servers on 127.0.0.1
s3            a real S3-compatible server (SeaweedFS `weed mini`) on 127.0.0.1, killable and restartable
"""
