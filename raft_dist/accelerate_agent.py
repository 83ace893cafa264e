"""`accelerate launch` as the launcher starts it: Accelerate's own parser and launch code with the
same arguments, then an exit that skips the interpreter's teardown.

`python -m raft_dist.accelerate_agent ARGS` runs exactly what `accelerate launch ARGS` runs. The
difference is the end. With torch imported, Python's teardown frees thousands of modules, about
0.8 s on 2 cores. That time came after the ranks had finished and added to every launch (the
ranks skip it too: cli.py's train). Nothing is left to do there: torch's elastic agent has
reaped the ranks, and their files are complete on disk. A failed launch ends as before
(Accelerate's exception or exit code, with the usual teardown).
"""

import os
import sys

from accelerate.commands.launch import main

if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
