"""lm-evaluation-harness through `local-completions` against a live gptserve, side by side with
the harness's own `hf` backend on the same Hugging Face folder: same perplexities, same
per-choice log-likelihoods, same greedy generations, with token-id and with text prompts."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from api_fixtures import serve_process

pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness: pip install 'lm-eval[api,hf]'")
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast  # noqa: E402

from model.tokenizer import GPT2_ASSETS_DIR  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CONTEXT = 256
SERVED_NAME = "tiny-eval"
TASKS = ("tiny_ppl", "tiny_mc", "tiny_gen")
PERPLEXITY_TEXTS = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.",
    "The quick brown fox jumps over the lazy dog. " * 14,  # longer than one window
    "Call me Ishmael. Some years ago - never mind how long precisely - having little or no "
    "money in my purse, and nothing particular to interest me on shore.",
]
QUESTIONS = [
    {"question": "The capital of France is", "choices": [" Paris", " London", " Rome"]},
    {"question": "Two plus two equals", "choices": [" four", " five", " twenty two"]},
    {"question": "A clear sky is", "choices": [" blue", " green", " red", " like the sea"]},
    {"question": "Water freezes at zero", "choices": [" degrees", " dollars"]},
]
PROMPTS = ["Once upon a time", "The king said:", "In the beginning there was", "HAMLET:"]


def write_model(folder: Path) -> None:
    """A small random-weight GPT-2 with GPT-2's tokenizer files, as a Hugging Face folder.

    The embedding is drawn wide so the greedy choices are clear, not near-ties.
    """
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=CONTEXT, vocab_size=50257)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                param.normal_(0.0, 0.1)
        model.transformer.wte.weight.normal_(0.0, 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copy(GPT2_ASSETS_DIR / "encoder.json", folder / "vocab.json")
    shutil.copy(GPT2_ASSETS_DIR / "vocab.bpe", folder / "merges.txt")
    GPT2TokenizerFast.from_pretrained(folder).save_pretrained(folder)


def write_tasks(folder: Path) -> None:
    """Three local tasks over JSON files: perplexity, multiple choice, greedy generation."""
    data = folder / "data"
    data.mkdir(parents=True)

    def jsonl(name: str, rows: list[dict[str, Any]]) -> Path:
        path = data / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path

    ppl = jsonl("ppl.jsonl", [{"text": text} for text in PERPLEXITY_TEXTS])
    mc = jsonl("mc.jsonl", [{**q, "answer": 0} for q in QUESTIONS])
    gen = jsonl("gen.jsonl", [{"prompt": p, "target": "-"} for p in PROMPTS])
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {ppl}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
    )
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {mc}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    (folder / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {gen}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )


def run_harness(model: str, model_args: str, tasks: Path, out: Path) -> dict[str, Any]:
    """Run the `lm_eval` command; returns its results and per-task samples."""
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        ",".join(TASKS),
        "--include_path",
        str(tasks),
        "--batch_size",
        "4",
        "--device",
        "cpu",
        "--log_samples",
        "--output_path",
        str(out),
    ]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert finished.returncode == 0, finished.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    samples = {
        task: [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).open()]
        for task in TASKS
    }
    return {"results": json.loads(results_file.read_text())["results"], "samples": samples}


def loglikelihoods(run: dict[str, Any], task: str) -> list[list[float]]:
    """Per document, the log-likelihood of each choice, or of the whole text (rolling)."""
    by_doc = sorted(run["samples"][task], key=lambda sample: sample["doc_id"])
    if task == "tiny_ppl":  # resps: [[total]]
        return [[float(sample["resps"][0][0])] for sample in by_doc]
    return [
        [float(resp[0][0]) for resp in sample["resps"]] for sample in by_doc
    ]  # [[[ll, greedy]]]


def generations(run: dict[str, Any]) -> list[str]:
    by_doc = sorted(run["samples"]["tiny_gen"], key=lambda sample: sample["doc_id"])
    return [sample["filtered_resps"][0] for sample in by_doc]


def test_harness_agrees_with_its_hf_backend(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    write_model(folder)
    write_tasks(tmp_path / "tasks")
    reference = run_harness(
        "hf", f"pretrained={folder},dtype=float32", tmp_path / "tasks", tmp_path / "hf"
    )
    served_args = ["--model", str(folder), "--served-model-name", SERVED_NAME]
    with serve_process(served_args, tmp_path / "serve.log") as url:
        runs = {
            tokenized: run_harness(
                "local-completions",
                f"model={SERVED_NAME},base_url={url}/v1/completions,"
                f"tokenizer_backend=huggingface,tokenizer={folder},"
                f"tokenized_requests={tokenized},max_length={CONTEXT}",
                tmp_path / "tasks",
                tmp_path / f"api-{tokenized}",
            )
            for tokenized in (True, False)
        }
    for tokenized, served in runs.items():
        for metric in ("word_perplexity,none", "byte_perplexity,none"):
            want = reference["results"]["tiny_ppl"][metric]
            got = served["results"]["tiny_ppl"][metric]
            assert math.isclose(got, want, rel_tol=1e-3), (tokenized, metric, got, want)
        for task in ("tiny_ppl", "tiny_mc"):
            want_rows = loglikelihoods(reference, task)
            got_rows = loglikelihoods(served, task)
            assert len(got_rows) == len(want_rows)
            for got_row, want_row in zip(got_rows, want_rows, strict=True):
                assert got_row == pytest.approx(want_row, rel=1e-3, abs=1e-3), (tokenized, task)
        assert generations(served) == generations(reference), tokenized
        assert any(text.strip() for text in generations(served))  # something was generated
