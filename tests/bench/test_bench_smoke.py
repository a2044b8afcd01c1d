"""The benchmarks run end to end on the tiny model and write every key; no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SETUP_KEYS = {"step_time_s", "peak_rss_mb", "baseline_rss_mb", "peak_rss_above_baseline_mb", "padding_fraction",
              "details", "step_time_s_rounds"}
SFT_KEYS = SETUP_KEYS | {"reply_tokens_per_s", "real_tokens_per_s", "loss_tokens_per_s", "processed_tokens_per_s",
                         "tokens_per_step", "unmatched_samples"}
SFT_RATIO_KEYS = {"reply_tokens_per_s", "real_tokens_per_s", "loss_tokens_per_s", "processed_tokens_per_s",
                  "speedup_step_time", "peak_rss", "peak_rss_above_baseline", "speedup_per_round"}


def run(*command: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_cpu_bench_writes_every_result_key(tmp_path, tiny_model_dir):
    """Five of make bench's eleven set-ups (one process each, ~15 s apiece; the suite has a 10-minute budget):
    the naive recipe, lorelay and TRL at its best for SFT; lorelay and TRL's one-base path for DPO. TRL's
    defaults (b) and the separate reference differ from those only in settings; the long-reply workload only in
    its data, which test_long_reply_workload_has_the_promised_lengths checks."""
    out = tmp_path / "cpu.json"
    run("bench/run.py", "--model", str(tiny_model_dir), "--steps", "2", "--warmup", "1", "--samples", "4",
        "--batch-size", "2", "--dpo-steps", "2", "--dpo-warmup", "1", "--dpo-samples", "8", "--repeats", "1",
        "--setups", "a,c,t", "--dpo-setups", "lorelay,trl-onebase", "--skip-long",
        "--out", str(out), "--log", str(tmp_path / "bench.log"))
    results = json.loads(out.read_text())

    assert {"date", "loadavg_before", "loadavg_after", "environment", "workload", "sft", "dpo", "targets"} <= results.keys()
    assert results["complete"] is True  # written after each workload; the last write marks the run complete
    sft = results["sft"]
    assert list(sft["setups"]) == ["a", "c", "t"]
    for name, setup in sft["setups"].items():
        assert SFT_KEYS <= setup.keys(), (name, SFT_KEYS - setup.keys())
        assert setup["unmatched_samples"] == 0, name  # every batch's samples were recognised
        assert {"loss_path", "loss_type", "padding", "attn_implementation"} <= setup["details"].keys(), name
    assert sft["same_samples"], "the set-ups must train on the same samples"
    assert sft["setups"]["c"]["padding_fraction"] == sft["setups"]["t"]["padding_fraction"] == 0.0  # padding-free
    assert sft["setups"]["a"]["padding_fraction"] > 0
    # lorelay runs attention once per packed sample; TRL at its best runs sdpa over the whole row
    assert sft["setups"]["c"]["details"]["attn_implementation"] == "sdpa_packed"
    assert sft["setups"]["t"]["details"]["attn_implementation"] == "sdpa"
    assert sft["setups"]["a"]["tokens_per_step"]["processed"] == 2 * 512  # padded to exactly 512
    # lorelay and TRL at its best both take the loss on the replies only; the naive recipe on every token
    for name in ("c", "t"):
        tokens = sft["setups"][name]["tokens_per_step"]
        assert tokens["loss"] == tokens["reply"] < tokens["real"], name
    for key in ("c_over_a", "c_over_t"):
        assert SFT_RATIO_KEYS <= sft["ratios"][key].keys()

    dpo = results["dpo"]
    assert list(dpo["setups"]) == ["lorelay", "trl-onebase"]
    for name, setup in dpo["setups"].items():
        assert SETUP_KEYS | {"pairs_per_s"} <= setup.keys(), (name, SETUP_KEYS - setup.keys())
        assert {"loss_path", "loss_type", "batching", "attn_implementation"} <= setup["details"].keys(), name
    lorelay = dpo["setups"]["lorelay"]
    assert lorelay["details"]["batching"] == "packed, prompt shared" and lorelay["padding_fraction"] == 0.0
    assert "adapter" in lorelay["details"]["reference"]
    assert "one base" in dpo["setups"]["trl-onebase"]["details"]["reference"]
    assert {"pairs_per_s", "peak_rss", "peak_rss_above_baseline", "speedup_per_round"} <= (
        dpo["ratios"]["lorelay_over_trl-onebase"].keys())

    assert {t["name"] for t in results["targets"]} >= {"sft_c_over_t", "dpo_pairs_per_s", "dpo_memory"}
    for target in results["targets"]:
        if target["name"] in ("sft_c_over_t", "dpo_pairs_per_s", "dpo_memory"):
            assert target["value"] is not None and isinstance(target["met"], bool), target
    table = out.with_suffix(".md").read_text()
    assert "| (t) TRL best |" in table and "## Targets" in table


def test_long_reply_workload_has_the_promised_lengths(tokenizer):
    sys.path.insert(0, str(ROOT / "bench"))
    from workloads import PROMPT_TOKENS, REPLY_TOKENS, long_reply_workload

    sft, pairs = long_reply_workload(tokenizer, 12)

    def tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    for record in sft:
        assert REPLY_TOKENS[0] <= tokens(record["messages"][-1]["content"]) <= REPLY_TOKENS[1]
    for pair in pairs:
        assert PROMPT_TOKENS[0] <= sum(tokens(m["content"]) for m in pair["prompt"]) <= PROMPT_TOKENS[1] + 60
        for side in ("chosen", "rejected"):
            assert REPLY_TOKENS[0] <= tokens(pair[side][0]["content"]) <= REPLY_TOKENS[1]
    assert any(len(pair["prompt"]) == 3 for pair in pairs)  # some prompts are multi-turn


def test_trl_best_template_renders_like_the_models_own(tokenizer):
    sys.path.insert(0, str(ROOT / "bench"))
    from trl_best import generation_template

    conversations = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                     [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                      {"role": "assistant", "content": "d"}]]
    marked = generation_template(tokenizer, conversations)
    assert "{% generation %}" in marked
    rendered = tokenizer.apply_chat_template(conversations[1], tokenize=True, return_dict=True, chat_template=marked,
                                             return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(rendered["input_ids"], rendered["assistant_masks"]) if m]
    assert tokenizer.decode(masked) == "b<|im_end|>d<|im_end|>"


def test_gpu_bench_without_cuda_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = subprocess.run([sys.executable, "bench/gpu.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr and "--dry-run" in result.stderr


@pytest.mark.slow
def test_data_check_bench_times_both_readers_on_the_same_rows(tmp_path, smollm2_dir):
    """bench/data_check.py (issue 17's target) on 50 rows, one round: both commands run and the result has
    every key; no timing is asserted."""
    out = tmp_path / "data_check.json"
    run("bench/data_check.py", "--rows", "50", "--rounds", "1", "--json", str(out), timeout=600)
    result = json.loads(out.read_text())
    assert result["rows"] == 50 and set(result["medians"]) == {"datasets", "lorelay"}
    assert all(value > 0 for times in result["medians"].values() for value in times.values())
    assert len(result["ratio_wall_per_round"]) == 1 and result["ratio_wall"] > 0
