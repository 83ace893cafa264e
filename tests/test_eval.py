"""`raft-dist eval` and `ask` on the tiny random model: the real CLI, real generation.

The metric functions have their own hand-made cases (test_eval_metrics.py); here the question
is whether the plumbing around them is right: prompts equal training's, every question is
scored once (also across processes), reports parse, bad input gets one clear line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from helpers import ROOT, free_port, offline_env, raft_record, run_cli, write_dataset

from raft_dist.data.records import parse_record
from raft_dist.data.sources import load_shards
from raft_dist.data.streaming import RankStream, StreamSettings
from raft_dist.data.tokenize import IGNORE_INDEX, encode_prompt
from raft_dist.evaluation.items import ROBUSTNESS_COUNTS, load_eval_set, robustness_items
from raft_dist.model import TINY_TOKENIZER

TINY = "builtin:tiny-llama"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


def write_eval_set(path: Path, count: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    records = [raft_record(rng, i) for i in range(count)]
    records[1]["oracle_index"] = None  # one question without its oracle
    records[1]["documents"] = [
        d for d in records[1]["documents"] if d["text"] != records[1]["oracle"]
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return records


def test_eval_prompt_is_the_training_prompt(tmp_path: Path, tokenizer) -> None:
    """The ids eval feeds the model equal the prompt part of the training batch."""
    write_dataset(tmp_path / "data", [3])
    item = load_eval_set(str(tmp_path / "data"))[0]
    settings = StreamSettings(max_seq_len=512, micro_batch_size=1, shuffle_shards=False, seed=0)
    stream = RankStream(
        load_shards(str(tmp_path / "data")), tokenizer, settings, rank=0, world_size=1
    )
    batch = stream.next_batch()
    prompt_len = int((batch["labels"][0] == IGNORE_INDEX).sum())
    trained = batch["input_ids"][0][:prompt_len].tolist()
    assert encode_prompt(tokenizer, item.prompt) == trained


def test_robustness_variants_keep_the_oracle_and_count_distractors(tmp_path: Path) -> None:
    write_eval_set(tmp_path / "set.jsonl", 12)
    items = load_eval_set(str(tmp_path / "set.jsonl"))
    variants, short = robustness_items(items, ROBUSTNESS_COUNTS, seed=3)
    with_oracle = [i for i in items if i.oracle_index is not None]
    assert len(variants) == len(with_oracle) * len(ROBUSTNESS_COUNTS)
    assert short == {k: 0 for k in ROBUSTNESS_COUNTS}
    for variant in variants:
        k = int(variant.variant[2:])
        assert len(variant.documents) == k + 1
        assert variant.oracle == next(i.oracle for i in items if i.id == variant.id)
        assert len({d.text for d in variant.documents}) == k + 1  # no document twice
        assert variant.prompt.endswith("Answer: ") and variant.question in variant.prompt
    again, _ = robustness_items(items, ROBUSTNESS_COUNTS, seed=3)
    assert [v.prompt for v in again] == [v.prompt for v in variants]  # seeded: same prompts


def test_eval_end_to_end_with_adapter_and_plain_records(tmp_path: Path) -> None:
    """Two models on one base (the base loads once), a RAFT set and an instruction set."""
    import torch
    from peft import LoraConfig, get_peft_model

    from raft_dist.config import ModelConfig
    from raft_dist.model import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path=TINY)
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    base = load_model(cfg, tok)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # an adapter that changes the outputs
    lora.save_pretrained(tmp_path / "adapter")

    write_eval_set(tmp_path / "raft.jsonl", 6)
    plain = tmp_path / "plain.jsonl"
    plain.write_text(
        "".join(
            json.dumps({"instruction": f"Say the word {w}.", "output": f"The word is {w}."}) + "\n"
            for w in ("harbour", "lantern", "ferry")
        ),
        encoding="utf-8",
    )
    out = tmp_path / "report"
    base_dir = str(tmp_path / "base")
    result = run_cli(
        "eval",
        "--model", base_dir,
        "--model", f"{base_dir}+{tmp_path / 'adapter'}",
        "--data", f"raft={tmp_path / 'raft.jsonl'}",
        "--data", f"plain={plain}",
        "--out", str(out),
        "--max-new-tokens", "12",
        "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| model |" in result.stdout and "vs" in result.stdout  # table and difference
    report = json.loads((out / "report.json").read_text())
    assert [m["model"] for m in report["models"]] == [
        base_dir,
        f"{base_dir}+{tmp_path / 'adapter'}",
    ]
    assert report["models"][1]["adapter"] == str(tmp_path / "adapter")
    assert (out / "report.md").read_text().startswith("## raft-dist eval")
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for model in report["models"]:
        raft, plain_metrics = model["sets"]["raft"], model["sets"]["plain"]
        assert raft["all"]["n"] == 6 and plain_metrics["all"]["n"] == 3
        assert raft["oracle_present"]["n"] == 5 and raft["oracle_absent"]["n"] == 1
        assert sorted(int(k) for k in raft["robustness"]) == list(ROBUSTNESS_COUNTS)
        assert all(v["n"] == 5 for v in raft["robustness"].values())
        for key in ("em", "f1", "contained", "follows_format"):
            assert 0.0 <= raft["all"][key] <= 1.0
        # No answer tag in the instruction set's gold: only F1 and containment apply.
        assert plain_metrics["all"]["em"] is None and plain_metrics["all"]["follows_format"] is None
        assert 0.0 <= plain_metrics["all"]["f1"] <= 1.0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * (6 + 3 + 5 * len(ROBUSTNESS_COUNTS))
    outputs = {
        m: [r["output"] for r in rows if r["model"] == m] for m in {r["model"] for r in rows}
    }
    assert len(set(map(tuple, outputs.values()))) == 2  # the adapter was really applied


def test_base_shared_by_several_models_loads_once(tmp_path: Path, monkeypatch) -> None:
    import raft_dist.model as model_module
    from raft_dist.evaluation.models import ModelCache, ModelSpec

    loads = []
    real = model_module.load_model
    monkeypatch.setattr(
        model_module, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k)
    )
    cache = ModelCache("cpu", "float32")
    for _ in range(3):
        with cache.use(ModelSpec.parse(TINY)) as (model, _tok):
            assert model is not None
    assert len(loads) == 1


def test_merged_adapter_decodes_like_the_adapter_and_leaves_the_base_exact(
    tmp_path: Path,
) -> None:
    """The adapter is merged for its turn; the base's weights come back bit for bit."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from raft_dist.config import ModelConfig
    from raft_dist.evaluation.models import ModelCache, ModelSpec
    from raft_dist.model import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path=TINY, dtype="bfloat16")
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    base = load_model(cfg, tok)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    lora = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    lora.save_pretrained(tmp_path / "adapter")

    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    cache = ModelCache("cpu", "bfloat16")
    plain = ModelSpec.parse(str(tmp_path / "base"))
    adapted = ModelSpec.parse(f"{tmp_path / 'base'}+{tmp_path / 'adapter'}")
    with cache.use(plain) as (model, _tok), torch.no_grad():
        before = {k: v.clone() for k, v in model.state_dict().items()}
        base_logits = model(ids).logits.float()
    with cache.use(adapted) as (model, _tok), torch.no_grad():
        assert not any("lora" in name for name, _ in model.named_modules())  # merged
        merged_logits = model(ids).logits.float()
        saved_base = ModelConfig(name_or_path=str(tmp_path / "base"), dtype="bfloat16")
        reference = PeftModel.from_pretrained(
            load_model(saved_base, tok).eval(), str(tmp_path / "adapter")
        ).eval()
        unmerged_logits = reference(ids).logits.float()
    assert not torch.allclose(merged_logits, base_logits, atol=1e-2)  # the adapter acts
    scale = unmerged_logits.abs().max()
    torch.testing.assert_close(merged_logits, unmerged_logits, rtol=0, atol=0.05 * scale)
    with cache.use(plain) as (model, _tok):
        after = model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before)


def test_eval_on_two_processes_scores_every_question_once(tmp_path: Path) -> None:
    """accelerate launch, 2 CPU processes: disjoint parts, gathered, each question once."""
    records = write_eval_set(tmp_path / "set.jsonl", 7)
    out = tmp_path / "report"
    command = [
        "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "accelerate_configs/cpu.yaml"),
        "--num_processes", "2",
        "--main_process_port", str(free_port()),
        "-m", "raft_dist.cli", "eval",
        "--model", TINY, "--data", str(tmp_path / "set.jsonl"), "--out", str(out),
        "--max-new-tokens", "6", "--robustness", "0,2", "--no-progress",
    ]  # fmt: skip
    import subprocess
    import sys

    env = offline_env(ACCELERATE_USE_CPU="1")
    result = subprocess.run(
        [sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["processes"] == 2
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    keys = [(r["id"], r["variant"]) for r in rows]
    expected = [(r["id"], "main") for r in records]
    expected += [
        (r["id"], f"k={k}") for r in records if r["oracle_index"] is not None for k in (0, 2)
    ]
    assert sorted(keys) == sorted(expected)  # every question exactly once
    assert {r["rank"] for r in rows} == {0, 1}  # both ranks answered a part


def test_eval_refuses_bad_input_with_one_line(tmp_path: Path) -> None:
    no_answer = tmp_path / "no_answer.jsonl"
    record = raft_record(random.Random(0), 0)
    del record["cot_answer"]
    no_answer.write_text(json.dumps(record) + "\n", encoding="utf-8")
    good = tmp_path / "good.jsonl"
    write_eval_set(good, 3)
    other_base = tmp_path / "adapter-other"
    _write_adapter_for_gpt2(other_base)
    cases = [
        (["--model", TINY, "--data", str(no_answer)], f"{no_answer}:1"),
        (
            ["--model", str(tmp_path / "missing" / "model"), "--data", str(good)],
            "no such model folder",
        ),
        (["--model", f"{TINY}+{other_base}", "--data", str(good)], "does not fit the base"),
        (["--model", f"{TINY}+{tmp_path}", "--data", str(good)], "holds no adapter_config.json"),
    ]
    cases += [
        (["--model", TINY, "--data", str(good), "--data", str(good)], "is used twice"),
        (["--model", TINY, "--data", str(good), "--robustness", "1,x"], "--robustness 1,x"),
        (["--model", TINY, "--data", str(good), "--batch-size", "0"], "--batch-size must be"),
    ]
    for args, expected in cases:
        result = run_cli("eval", *args, "--out", str(tmp_path / "r"), "--no-progress")
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert expected in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    # A ZeRO-3 launch is refused before any process group or model is set up.
    env = offline_env(WORLD_SIZE="2", ACCELERATE_DEEPSPEED_ZERO_STAGE="3")
    result = run_cli(
        "eval", "--model", TINY, "--data", str(good), "--out", str(tmp_path / "r"), env=env
    )
    assert result.returncode == 2 and "eval under ZeRO-3 is refused" in result.stderr


def _write_adapter_for_gpt2(folder: Path) -> None:
    """A LoRA adapter trained on another architecture (tiny GPT-2: other module names)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from raft_dist.config import ModelConfig
    from raft_dist.model import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path="builtin:tiny-gpt2")
    torch.manual_seed(0)
    model = load_model(cfg, load_tokenizer(cfg))
    get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(folder)


def test_ask_with_documents_and_with_a_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "mill.md").write_text(
        "# The Tide Mill\n\nThe tide mill grinds oats. Its wheel is four metres wide.\n"
    )
    (corpus / "ferry.md").write_text(
        "# The Ferry\n\nThe ferry sails at noon. It carries twelve cars.\n"
    )
    result = run_cli(
        "ask", "--model", TINY, "--doc", str(corpus / "mill.md"), "--max-new-tokens", "8",
        "How wide is the wheel?",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "documents: The Tide Mill" in result.stdout
    assert "answer:" in result.stdout
    result = run_cli(
        "ask", "--model", TINY, "--corpus", str(corpus), "--top-k", "1", "--max-new-tokens", "8",
        "--no-stream", "How many cars does the ferry carry?",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "documents: The Ferry" in result.stdout  # BM25 picked the ferry, not the mill
    # Interactive: one question per line, ends at end of input.
    import subprocess

    from helpers import RAFT_DIST

    loop = subprocess.run(
        [*RAFT_DIST, "ask", "--model", TINY, "--max-new-tokens", "4"],
        input="first question\nsecond question\n",
        capture_output=True,
        text=True,
        env=offline_env(),
        cwd=ROOT,
        timeout=300,
    )
    assert loop.returncode == 0, loop.stderr[-2000:]
    assert loop.stdout.count("question> ") == 3  # two questions, then end of input


def test_eval_set_records_parse_like_training(tmp_path: Path) -> None:
    """A RAFT-paper record and a seed instruction record load as eval items."""
    paper = {
        "id": "p1",
        "question": "What grinds oats?",
        "context": {
            "title": [["Mill", "Ferry"]],
            "sentences": [["The mill grinds oats.", "The ferry sails."]],
        },
        "oracle_context": "The mill grinds oats.",
        "cot_answer": "##begin_quote## The mill grinds oats. ##end_quote## <ANSWER>: the mill",
    }
    parse_record(paper, "x", 1)  # the readers accept it
    path = tmp_path / "paper.jsonl"
    path.write_text(json.dumps(paper) + "\n", encoding="utf-8")
    (item,) = load_eval_set(str(path))
    assert item.gold == "the mill" and item.answer_only and item.oracle == "The mill grinds oats."


def test_generation_stops_after_the_answer_line_and_cuts_there() -> None:
    from raft_dist.data.answers import cut_after_final_answer
    from raft_dist.evaluation.generation import answer_line_done

    assert not answer_line_done("The relevant passage says ##begin_quote## x ##end_quote##")
    assert not answer_line_done("<ANSWER>: Paris")  # the line may still grow
    assert not answer_line_done("<ANSWER>:\n")  # nothing answered yet
    assert answer_line_done("so\n<ANSWER>: Paris\n")
    assert cut_after_final_answer("a <ANSWER>: x\n<ANSWER>: Paris\nrambling on") == (
        "a <ANSWER>: x\n<ANSWER>: Paris"
    )
    assert cut_after_final_answer("no tag\nat all") == "no tag\nat all"


@pytest.mark.parametrize("name", [TINY, "builtin:tiny-gpt2"])
def test_prompts_prefilled_alone_decode_like_one_padded_batch(name: str, monkeypatch) -> None:
    """On CPU each prompt is prefilled alone and the caches are joined left-padded: the greedy
    continuations equal those of one padded batch (fp32), and `generate` really continues
    from the joined cache (its first forward sees one token per row, not the prompts)."""
    import torch

    from raft_dist.evaluation import generation
    from raft_dist.evaluation.models import ModelCache, ModelSpec

    model, tokenizer = ModelCache("cpu", "float32")._load_base(ModelSpec.parse(name))
    torch.manual_seed(1)
    rows = [torch.randint(10, 200, (n,)).tolist() for n in (37, 5, 80, 2, 60)]
    widths: list[int] = []

    def record(module, args, kwargs):
        widths.append(kwargs["input_ids"].shape[1])

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        assert generation.use_prefill_alone(model, rows)
        alone = generation.generate_ids(model, tokenizer, rows, 24)
        prefills, first_step = widths[: len(rows)], widths[len(rows)]
        widths.clear()
        monkeypatch.setattr(generation, "use_prefill_alone", lambda model, rows: False)
        padded = generation.generate_ids(model, tokenizer, rows, 24)
    finally:
        hook.remove()
    assert prefills == [n - 1 for n in (37, 5, 80, 2, 60)] and first_step == 1
    assert widths[0] == 80  # the padded path prefills the whole padded batch
    assert alone == padded
    # Tokens alone can hide a misplaced cache (a random model leans on its last token): the
    # next-token logits from the joined cache equal those of the whole padded batch.
    ids, mask = generation.left_pad(rows, 0)
    with torch.inference_mode():
        cache = generation.prefill_alone(model, rows)
        name = generation._cache_argument(model)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        joined = model(
            input_ids=ids[:, -1:],
            attention_mask=mask,
            position_ids=position[:, -1:],
            **{name: cache},
        ).logits[:, -1]
        whole = model(input_ids=ids, attention_mask=mask, position_ids=position).logits[:, -1]
    torch.testing.assert_close(joined, whole, rtol=1e-4, atol=1e-4)
