"""torchrun's elastic agent, with workers forked from a server that has already imported torch and ecpt.

``python -m launch.agent <torchrun flags> -m elastic.worker --config-json RUN_DIR/config.json``

Same flags, same c10d rendezvous, same restart and membership logic as ``python -m torch.distributed.run``: this
module parses the command line with torchrun's own parser and calls torchrun's own ``elastic_launch``. The one
difference is how a worker process starts. torchrun runs a module entry point as a fresh interpreter, so every
restart of every worker pays ``import torch`` again (2-3 s on these machines, most of a worker-kill recovery).
Here the entry point is a Python function and the start method is ``forkserver`` with ``elastic.worker``
preloaded: the fork server imports once, when the first worker starts, and every later worker is a fork of it.
The fork server is single-threaded (unlike the agent, whose keep-alive thread makes a plain fork unsafe), has
never run a torch op (no OpenMP pool is forked) and never touches CUDA (workers initialise their own device).

Process tree: agent -> fork server -> workers. Each link is bound by PR_SET_PDEATHSIG (``launch.forkserver_guard``
and ``elastic.worker.die_with_parent``), so a SIGKILLed agent takes its fork server and workers along. Fault
injection finds the agent through ``ECPT_AGENT_PID`` because a worker's parent is the fork server.

The command line lives in ``launch/agent/__main__.py``, not here: multiprocessing re-runs the parent's main module
in every forked worker unless its name ends in ``.__main__``, and this module, preloaded into the fork server,
would then run a second time in each worker (with runpy's "found in sys.modules" RuntimeWarning).

The agent is also the one process that knows the run has ended on this node (its workers cannot tell a resize's
SIGTERM from a preemption's), so it frees the node's memory checkpoints then (``elastic.memory_levels``, rule 3).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import sys

from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.api import SignalException

from elastic.process_env import AGENT_PID_ENV

WORKER_MODULE = "elastic.worker"


def run_worker(*argv: str) -> int:
    """The workers' entry point (runs in a fork of the fork server, with torchrun's RANK etc. in os.environ)."""
    from elastic.worker import main
    from launch.forkserver_guard import STOP_SIGNALS

    for sig in STOP_SIGNALS:  # ignored by the fork server, wanted here
        signal.signal(sig, signal.SIG_DFL)
    return main(list(argv))


class ForkedWorkersAgent(LocalElasticAgent):
    """torchrun's local agent, minus a 30 s stall when it stops a group of function-entry-point workers.

    torch's worker wrapper returns the function's value through a queue, then waits for the agent to signal that
    it read it. An agent stopping the group (restart, membership change, shutdown) sends SIGTERM once and never
    reads: a worker that handles SIGTERM by saving and returning (ours) then waits until the SIGKILL 30 s later.
    Releasing the wait first lets such workers exit as soon as they are done.
    """

    def _shutdown(self, death_sig: signal.Signals = signal.SIGTERM, timeout: int = 30) -> None:
        if self._pcontext is not None:
            self._pcontext._worker_finished_event.set()  # MultiprocessContext's "return values were read"
        super()._shutdown(death_sig, timeout)


class PreformattedTraceback(logging.Filter):
    """Renders a record's traceback as plain text before torch's log formatter sees it.

    torch's formatter (``torch._logging._internal.TorchLogsFormatter``) imports ``torch._dynamo`` to format any
    record that carries ``exc_info``, and the agent's first such record is the "failed (exitcode: -9)" of a dead
    worker: measured here, 1.4 s of imports (sympy, inductor) between noticing the failure and restarting the
    worker, on the recovery path of every first fault. The text of the log line is unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.exc_text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return True


def install_traceback_filter() -> None:
    """On every handler of torch's loggers, once: torch gives several their own handler (``torch``,
    ``torch.distributed``, where torchrun's agent logs, ...)."""
    loggers = [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict) if name.startswith("torch")]
    for handler in {h for logger in loggers for h in logger.handlers}:
        if not any(isinstance(f, PreformattedTraceback) for f in handler.filters):
            handler.addFilter(PreformattedTraceback())


def preload_modules(worker_args: list[str]) -> list[str]:
    """What the fork server imports once: the worker, and what the config makes a worker import at start-up."""
    modules = [WORKER_MODULE, __name__]  # each worker unpickles run_worker from this module
    if "--config-json" in worker_args:
        with open(worker_args[worker_args.index("--config-json") + 1]) as f:
            if json.load(f).get("train", {}).get("deterministic"):
                modules.append("torch._inductor.config")  # torch.use_deterministic_algorithms imports it: 2.5 s
    # Not DeepSpeed (0.4 s): its import probes the accelerator, and a CUDA driver initialised in the fork server
    # would be unusable in every forked worker. The guard comes last, so it also checks that nothing did.
    return modules + ["launch.forkserver_guard"]


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.launcher import api as launcher_api
    from torch.distributed.run import config_from_args, get_args_parser

    parser = get_args_parser()
    parser.prog = "python -m launch.agent"  # argparse's default would be this package's "__main__.py"
    args = parser.parse_args(argv)
    if not args.module or args.training_script != WORKER_MODULE:
        raise SystemExit(
            f"launch.agent starts only `-m {WORKER_MODULE}`, got {args.training_script!r}; "
            f"run other scripts with torchrun"
        )
    install_traceback_filter()
    config, _cmd, _cmd_args = config_from_args(args)
    config.start_method = "forkserver"
    multiprocessing.set_forkserver_preload(preload_modules(args.training_script_args))
    os.environ[AGENT_PID_ENV] = str(os.getpid())  # inherited by the fork server, so by every worker
    launcher_api.LocalElasticAgent = ForkedWorkersAgent  # the class torchrun's launch_agent instantiates
    try:
        launcher_api.elastic_launch(config=config, entrypoint=run_worker)(*args.training_script_args)
    except SignalException:  # stopped on a signal: the workers have saved and exited (or been killed)
        release_node_memory(args.training_script_args)
        raise
    release_node_memory(args.training_script_args)  # finished; a failure (ChildFailedError) keeps the memory


def release_node_memory(worker_args: list[str]) -> None:
    """The run ended on this node and none of its workers runs any more: free this node's memory checkpoints
    when their newest step is durable on a slower level (``elastic.checkpoints.release_memory_level``)."""
    from elastic.checkpoints import release_memory_level
    from elastic.config import config_from_json

    log = logging.getLogger("ecpt.agent")
    if not log.handlers:  # torch configures its own loggers only; this one prints next to the workers' lines
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s [agent] %(message)s", datefmt="%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    release_memory_level(config_from_json(worker_args[worker_args.index("--config-json") + 1]), log)
