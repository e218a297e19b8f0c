"""EleutherAI's lm-evaluation-harness against a cluster: its `local-completions` model pointed at `layerline api`
over two stages runs a small multiple-choice task (written here as local JSON lines with a task YAML; nothing from
any hub) and gets the same per-choice log-likelihoods (float32, within 1e-4), the same greedy flags and the same
accuracy as lm-eval's own `hf` model on the same checkpoint (transformers in this process)."""

from __future__ import annotations

import json
import urllib.request

import pytest

from layerline.local_cluster import LocalApi, LocalCluster
from tiny_models import TinySpec

SPEC = TinySpec("llama", layers=4)
ITEMS = [
    ("the capital of france is", ["paris", "rome", "a small dog"], 0),
    ("two plus two is", ["four", "five hundred", "blue"], 0),
    ("the cat sat on the", ["mat", "moon", "idea of it"], 0),
    ("hello world, this is a", ["test", "tiny model", "question"], 1),
    ("water is", ["wet", "dry as sand", "loud"], 0),
    ("the sky is", ["green", "blue", "made of cheese"], 1),
]
TASK = """\
task: layerline_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture()
def task_dir(tmp_path, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")  # nothing from any hub: the task's data is the file below
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ITEMS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "layerline_mc.yaml").write_text(TASK.format(data=data))
    return str(tmp_path / "tasks")


def evaluate(model: str, model_args: dict, task_dir: str) -> tuple[float, list[list[tuple[float, bool]]]]:
    """lm-eval's accuracy on the task and, per item, (log-likelihood, is greedy) of each choice."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["layerline_mc"],
        task_manager=TaskManager(include_path=task_dir),
        log_samples=True,
        batch_size=1,
    )
    samples = sorted(out["samples"]["layerline_mc"], key=lambda s: s["doc_id"])
    per_item = [[(float(r[0][0]), bool(r[0][1])) for r in s["resps"]] for s in samples]
    return out["results"]["layerline_mc"]["acc,none"], per_item


def test_lm_eval_local_completions_matches_its_hf_model(tiny_checkpoint, task_dir):
    folder, _ = tiny_checkpoint(SPEC)
    with LocalCluster(folder, [(0, 2), (2, 4)], threads=1) as stages, LocalApi(route=stages.route) as api:
        with urllib.request.urlopen(api.url + "/v1/models", timeout=30) as r:
            name = json.load(r)["data"][0]["id"]
        acc, got = evaluate(
            "local-completions",
            {
                "base_url": api.url + "/v1/completions",
                "model": name,
                "tokenizer_backend": "huggingface",
                "tokenizer": folder,
                "tokenized_requests": True,
                "num_concurrent": 1,
                "max_retries": 1,
            },
            task_dir,
        )
    want_acc, want = evaluate("hf", {"pretrained": folder, "dtype": "float32", "device": "cpu"}, task_dir)
    assert len(got) == len(ITEMS) and all(len(g) == len(c) for g, (_, c, _) in zip(got, ITEMS, strict=True))
    for item, expected in zip(got, want, strict=True):
        assert [ll for ll, _ in item] == pytest.approx([ll for ll, _ in expected], abs=1e-4, rel=1e-6)
        assert [greedy for _, greedy in item] == [greedy for _, greedy in expected]
    assert acc == want_acc
    # the task is not a foregone conclusion either way: the log-likelihoods differ between choices
    assert all(len({round(ll, 3) for ll, _ in item}) > 1 for item in want)
