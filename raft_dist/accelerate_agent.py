"""`accelerate launch` as the launcher starts it: Accelerate's own parser and launch code with the
same arguments, then an exit that skips the interpreter's teardown.

`python -m raft_dist.accelerate_agent ARGS` runs exactly what `accelerate launch ARGS` runs. The
difference is the end. With torch imported, Python's teardown frees thousands of modules after
the ranks have finished; skipping it saved 0.2-0.7 s per 2-process launch in most runs of
bench/process_exit.py on 2 cores, within the noise in one. Nothing is left to do there: torch's
elastic agent has reaped the ranks, and their files are complete on disk. The ranks and every
raft-dist command end the same way (cli.run, process.exit_now). A failed launch ends as before
(Accelerate's exception or exit code, with the usual teardown).
"""

from accelerate.commands.launch import main

from raft_dist.process import exit_now

if __name__ == "__main__":
    main()
    exit_now(0)
