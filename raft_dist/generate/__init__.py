"""RAFT data set generation: source documents -> chunks -> questions with distractors -> shards.

`raft-dist generate` runs `pipeline.generate`; `raft-dist validate` runs `validate_set.validate`.
Nothing here imports torch or transformers, so generation runs on any machine.
"""
