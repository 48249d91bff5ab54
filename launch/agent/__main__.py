"""``python -m launch.agent``: torchrun's elastic agent with forked workers (see ``launch.agent``).

A separate ``__main__`` module because multiprocessing skips re-running a main module named ``*.__main__`` in the
workers it starts; the agent itself stays an ordinary module the fork server preloads once.
"""

import sys

from launch.agent import main

main(sys.argv[1:])
