"""Our GGUF files in a real llama.cpp (llama-cpp-python, the `still[gguf]` extra that
`scripts/setup.sh dev` builds once and caches): a tiny model trained here, exported at q8_0 (the
gguf package) and q4_k_m (llama.cpp's quantizer, with an importance matrix), then loaded by
llama.cpp, which must split the same tokens, give log-likelihoods within the type's tolerance
and generate the same greedy text as the fp32 model; and `still eval` scoring the files through
llama.cpp, next to the same tasks scored on the fp32 model in torch.

In CI the runtime is installed by the setup, so a missing one fails here instead of skipping.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch
from tiny_models import CORPUS, QA, build_tiny_llama, build_tiny_tokenizer

from eval.run import evaluate_model
from publish.gguf_files import KQuantSource, write_gguf
from publish.llama_cpp_check import TOLERANCES, check_in_llama_cpp
from still.errors import StillError

if not os.environ.get("CI"):
    pytest.importorskip("llama_cpp", reason="the llama.cpp runtime: bash scripts/setup.sh dev")

TEXTS = [
    "What does json.dumps do? Serialize obj to a JSON formatted str.",
    "<|im_start|>user\nWhat does abs do?<|im_end|>\n<|im_start|>assistant\n",
]
# 256 wide: whole k-quant super-blocks, so q4_k_m really is q4_k/q6_k, not a fallback type.
HIDDEN = 256


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama trained for 60 steps on the QA pairs, saved as an HF dir."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer, hidden=HIDDEN, layers=2, seed=3)
    model.config.initializer_range = 0.02
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
        )
        for q, a in QA
    ]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(60):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("trained")
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, path, loss.item()


@pytest.fixture(scope="module")
def files(trained, tmp_path_factory):
    model, tokenizer, _, _ = trained
    out = tmp_path_factory.mktemp("gguf")
    reports = {}
    with KQuantSource(model, tokenizer, out, name="m", license=None, calibration=CORPUS) as source:
        for gguf_type in ("q8_0", "q4_k_m"):
            reports[gguf_type] = write_gguf(
                model,
                tokenizer,
                out / f"m-{gguf_type}.gguf",
                gguf_type,
                name="tiny",
                license=None,
                texts=TEXTS,
                k_quants=source,
                check_tokenizer=True,
            )
    return out, reports


def test_several_k_quants_share_one_f32_source_and_importance_matrix(
    trained, tmp_path, monkeypatch
):
    """q6_k and q4_k_m of one publish: the f32 GGUF is written once and the importance matrix
    computed once (for an 8B model, a 32 GB file and a pass over the calibration texts), and
    the f32 file is gone when the block ends."""
    import publish.gguf_files as gguf_files

    model, tokenizer, _, _ = trained
    made = {"imatrix": 0, "f32": 0}
    real_matrix, real_export = gguf_files.importance_matrix, gguf_files.export_gguf

    def counting_matrix(*args, **kwargs):
        made["imatrix"] += 1
        return real_matrix(*args, **kwargs)

    def counting_export(model, tokenizer, path, gguf_type, **kwargs):
        made["f32"] += gguf_type == "f32"
        return real_export(model, tokenizer, path, gguf_type, **kwargs)

    monkeypatch.setattr(gguf_files, "importance_matrix", counting_matrix)
    monkeypatch.setattr(gguf_files, "export_gguf", counting_export)
    with KQuantSource(model, tokenizer, tmp_path, name="m", license=None, calibration=CORPUS) as k:
        for gguf_type in ("q6_k", "q4_k_m"):
            report = write_gguf(
                model,
                tokenizer,
                tmp_path / f"m-{gguf_type}.gguf",
                gguf_type,
                name="m",
                license=None,
                texts=TEXTS,
                k_quants=k,
                check_tokenizer=False,
            )
            assert report["imatrix"]["tensors"] == 2 * 7
        assert k.path.is_file()
    assert made == {"imatrix": 1, "f32": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-q4_k_m.gguf", "m-q6_k.gguf"]


def test_the_model_learned_something(trained):
    assert trained[3] < 1.0  # the fixture trains: the checks below are on a non-random model


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_k_m"])
def test_llama_cpp_runs_the_file_within_the_types_tolerance(files, gguf_type):
    _, reports = files
    runtime = reports[gguf_type]["llama_cpp"]
    max_kl, min_agreement = TOLERANCES[gguf_type]
    assert 0 < runtime["mean_kl"] <= max_kl
    assert runtime["top1_agreement"] >= min_agreement
    assert runtime["tokens"] > 20
    if gguf_type == "q8_0":  # 8 bits: the same greedy text as fp32
        assert runtime["greedy_agreement"] == 1.0


def test_q4_k_m_is_a_real_k_quant_with_an_importance_matrix(files):
    from gguf import GGMLQuantizationType, GGUFReader

    out, reports = files
    types = {t.name: t.tensor_type for t in GGUFReader(out / "m-q4_k_m.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q4_K
    assert GGMLQuantizationType.Q6_K in set(types.values())  # the _m mix: some tensors at q6_k
    assert reports["q4_k_m"]["imatrix"]["tensors"] == 2 * 7  # every linear of both layers
    sizes = {t: (out / f"m-{t}.gguf").stat().st_size for t in ("q8_0", "q4_k_m")}
    assert sizes["q4_k_m"] < 0.75 * sizes["q8_0"]


def test_the_check_fails_on_a_file_that_is_not_the_model(files, trained):
    model, tokenizer, _, _ = trained
    out, _ = files
    other = build_tiny_llama(tokenizer, hidden=HIDDEN, layers=2, seed=9).eval()
    with pytest.raises(StillError, match="in llama.cpp: mean KL"):
        check_in_llama_cpp(out / "m-q8_0.gguf", other, tokenizer, TEXTS, "q8_0")


def write_tasks(directory):
    rows = [{"q": q, "a": a} for q, a in QA]
    (directory / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    choices = [
        {"q": q, "choices": [a, QA[(i + 1) % len(QA)][1], QA[(i + 3) % len(QA)][1]], "label": 0}
        for i, (q, a) in enumerate(QA)
    ]
    (directory / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in choices))
    (directory / "mc.yaml").write_text(
        "name: mc\ntype: multiple_choice\ndata: {path: mc.jsonl}\nprompt: '{{ q }}'\n"
        "choices: choices\nlabel: label\nchat_template: true\n"
    )
    (directory / "qa.yaml").write_text(
        "name: qa\ntype: generate\ndata: {path: qa.jsonl}\nprompt: '{{ q }}'\ntarget: '{{ a }}'\n"
        "chat_template: true\ngeneration: {max_new_tokens: 16}\nmetrics: [rouge_l, token_f1]\n"
    )
    return [str(directory / "mc.yaml"), str(directory / "qa.yaml")]


def test_still_eval_scores_the_files_through_llama_cpp(files, trained, tmp_path):
    out, _ = files
    _, _, hf_dir, _ = trained
    tasks = write_tasks(tmp_path)
    q8 = str(out / "m-q8_0.gguf")
    fp32 = evaluate_model(str(hf_dir), tasks, out_dir=tmp_path / "fp32", use_cache=False)
    ran = evaluate_model(q8, tasks, out_dir=tmp_path / "llama", use_cache=False)
    evaluate_model(q8, tasks, out_dir=tmp_path / "torch", use_cache=False, backend="transformers")
    by_task = {s["task"]: s for s in fp32}
    for summary in ran:
        reference = by_task[summary["task"]]
        for metric, value in summary["metrics"].items():
            assert value["mean"] == pytest.approx(reference["metrics"][metric]["mean"], abs=0.05)
    read = lambda d: np.array(  # noqa: E731
        [json.loads(line)["logliks"] for line in (tmp_path / d / "mc.samples.jsonl").open()]
    )
    llama, torch_gguf, ours = read("llama"), read("torch"), read("fp32")
    # The same file's weights in torch vs in llama.cpp (which also rounds the activations to
    # 8 bits for its q8_0 matmuls): within a few percent, the right answers (log p near 0) to
    # a few hundredths; and the same answer picked as by the fp32 model.
    assert (np.abs(llama - torch_gguf) / np.maximum(1.0, np.abs(torch_gguf))).max() < 0.05
    assert np.abs(llama[:, 0] - torch_gguf[:, 0]).max() < 0.05
    assert (llama.argmax(1) == ours.argmax(1)).all()
    assert not np.allclose(llama, torch_gguf)  # two runtimes really ran


def test_eval_of_a_gguf_without_the_runtime_is_a_one_line_error(files, tmp_path, monkeypatch):
    out, _ = files
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    tasks = write_tasks(tmp_path)
    with pytest.raises(StillError, match="needs llama-cpp-python, which is not installed"):
        evaluate_model(str(out / "m-q8_0.gguf"), tasks, out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()
