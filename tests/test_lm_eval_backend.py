"""The lm-evaluation-harness backend offline: local JSONL tasks end to end per mode, loglikelihood equal to an
independent causal LM on the AR view, unknown tasks named."""

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

import nld_lora  # noqa: E402
from nld_lora.evaluation.lm_eval_backend import NLDLM, TaskError, run_tasks  # noqa: E402
from nld_lora.modes import mode_plan  # noqa: E402
from tests.helpers import EMBEDDED, ROOT  # noqa: E402

GEN_TASK = """task: nld_test_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{reference}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
MC_TASK = """task: nld_test_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    rows = [json.loads(line) for line in (ROOT / "data" / "prompts" / "code_eval.jsonl").read_text().splitlines()]
    (folder / "gen.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "reference": r["reference"]}) + "\n"
                                              for r in rows[:4]))
    mc = [{"question": "def add(a, b):\n    return", "choices": [" a + b", " a ** b ** a"], "label": 0},
          {"question": "for i in range(", "choices": ["10):", "))))"], "label": 0}]
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (folder / "gen.yaml").write_text(GEN_TASK.format(data=folder / "gen.jsonl"))
    (folder / "mc.yaml").write_text(MC_TASK.format(data=folder / "mc.jsonl"))
    return folder


def test_local_tasks_run_per_mode_and_self_spec_scores_like_ar(task_dir):
    model = nld_lora.load(EMBEDDED)
    results = run_tasks(model, ["nld_test_gen", "nld_test_mc"], plans=mode_plan(),
                        include_path=str(task_dir), batch_size=2)
    assert set(results) == {"ar", "self_spec"}
    for task in ("nld_test_gen", "nld_test_mc"):
        assert results["ar"][task]["sample_len"] in (2, 4)
        assert {k: v for k, v in results["ar"][task].items()} == {k: v for k, v in results["self_spec"][task].items()}
    assert "acc,none" in results["ar"]["nld_test_mc"] and "exact_match,none" in results["ar"]["nld_test_gen"]


def test_loglikelihood_equals_an_independent_causal_lm_on_the_ar_view(tmp_path):
    from transformers import AutoModelForCausalLM

    from nld_lora.model.export import export_ar_view

    lm = NLDLM(model=nld_lora.load(EMBEDDED))
    hf = AutoModelForCausalLM.from_pretrained(str(export_ar_view(EMBEDDED, tmp_path / "view")),
                                              dtype=torch.float32).eval()

    class Req:
        def __init__(self, *args):
            self.args = args

    context, continuation = "def add(a, b):", "\n    return a + b"  # a split the tokenizer keeps
    (ll, greedy), = lm.loglikelihood([Req(context, continuation)])
    ctx = lm.tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = lm.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    assert whole[: len(ctx)] == ctx
    with torch.no_grad():
        logp = hf(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    expected = sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
    assert ll == pytest.approx(expected, abs=1e-4)
    assert greedy == all(int(logp[i - 1].argmax()) == whole[i] for i in range(len(ctx), len(whole)))
    (rolling,) = lm.loglikelihood_rolling([Req(continuation)])
    assert rolling < 0


def test_unknown_tasks_are_named(task_dir):
    with pytest.raises(TaskError, match=r"unknown lm-eval task\(s\) \['no_such_task'\]; tasks in .*nld_test_gen"):
        run_tasks(nld_lora.load(EMBEDDED), ["no_such_task"], plans=mode_plan(), include_path=str(task_dir))
