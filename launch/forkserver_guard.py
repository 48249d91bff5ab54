"""Preloaded last by ``launch.agent``'s fork server: it lives exactly as long as the agent, and forks cleanly.

- It dies with the agent (PR_SET_PDEATHSIG); workers are its children and die with it the same way, so a SIGKILLed
  agent takes its workers along. (Without this the workers keep the fork server alive, since each holds a copy of
  its liveness pipe, and a killed node would go on training as an orphan.)
- It ignores the stop signals that reach every process of a job at once (Ctrl-C forwarded to the agent's process
  group, SIGTERM from a scheduler, Slurm's USR1 warning): were it to die of them, its workers would be SIGKILLed
  before their emergency checkpoint. Workers restore the default handlers first thing (``launch.agent``).
- No preloaded module may have initialised CUDA: a forked worker could not use it.
"""

import signal

import torch

from elastic.worker import die_with_parent

if torch.cuda.is_initialized():
    raise RuntimeError(
        "a module preloaded into launch.agent's fork server initialised CUDA; forked workers could "
        "not use it: remove it from launch.agent.preload_modules"
    )

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

for _sig in STOP_SIGNALS:
    signal.signal(_sig, signal.SIG_IGN)
die_with_parent()
