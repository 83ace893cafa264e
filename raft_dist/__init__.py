"""raft-dist: RAFT fine-tuning of causal language models, from a laptop CPU to a Slurm cluster.

Importing the package is cheap on purpose: heavy libraries (torch, transformers, accelerate)
are imported by the modules that need them, so `raft-dist --help` stays instant.
"""

__version__ = "0.1.0"
