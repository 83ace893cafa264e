#!/usr/bin/env bash
# GPU acceptance checks of raft-dist, for a machine with one NVIDIA GPU (H100/H200/A100).
#
# What it measures (bench/gpu_check.py has the details and the MFU formula), in order of value:
#   (a) bf16 full fine-tune of a random ~1B Llama: tokens/s and MFU (target >= 40 %)
#   (d) packed attention: block-causal mask + SDPA vs flex_attention, outputs and grads close
#   (b) QLoRA NF4 of Llama-3-8B shapes, micro-batch 1 x 2k tokens: peak memory < 10 GiB, tokens/s
#   (c) LoRA on a bf16 base of the same shapes: peak memory, tokens/s
#   (e) DeepSpeed ZeRO-2 (skipped with a line when deepspeed is not installed)
# Each check prints one line (RESULT / SKIP / ERROR) and writes a JSON; summary.json has all.
#
# Usage (from the repository root; nothing is installed, raft_dist is imported from the tree):
#   bash bench/gpu_check.sh                  # real checks on the GPU, ~5-8 min on an H200
#   bash bench/gpu_check.sh --dry-run        # the same code paths on the CPU, tiny shapes (~30 s)
#   bash bench/gpu_check.sh --only a d       # some checks; --peak-tflops T for another GPU;
#                                            # --budget-s S (default 540): checks that no longer
#                                            # fit are skipped with a line instead of cut off
#
# On a GPU machine with a copy of this tree, from the repository root:
#   OUT=/some/results bash bench/gpu_check.sh   -> results in /some/results/gpu_check/
# Under a job time limit, keep --budget-s (default 540 s for the checks) below it: the
# checks are ordered so that the most valuable finish first.
# Needs python with torch (CUDA), transformers, peft, accelerate; bitsandbytes and deepspeed are
# optional. Set PYTHON to pick the interpreter. Outputs go to $OUT/gpu_check, else --out DIR,
# else bench/results/gpu_check (bench/results/gpu_check_dry for --dry-run).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" bench/gpu_check.py "$@"
