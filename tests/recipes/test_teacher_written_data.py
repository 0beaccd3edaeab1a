"""Teacher-written data end to end: a teacher trained here answers the prompts (locally or
through a real `transformers serve` on localhost), a judge filters, a finetune trains on it."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from tiny_models import QA

from still import cli
from still.rundir import RunDir

# The teacher also learns to act as a judge with this prompt: 9 for the right answer, 2 for
# another question's answer, so the model judge can be tested with a real model's replies.
JUDGE_PROMPT = "Score 0-10.\nQ: {question}\nA: {answer}"


def _judge_request(question, answer):
    return JUDGE_PROMPT.replace("{question}", question).replace("{answer}", answer)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("seqkd")
    _write_jsonl(path / "qa.jsonl", [{"question": q, "answer": a} for q, a in QA])
    return path


@pytest.fixture(scope="module")
def teacher_dir(workdir, tiny_model_dir):
    """The tiny model, fully fine-tuned until it answers QA (and judges) and then stops."""
    rows = [{"question": q, "answer": a} for q, a in QA]
    for index, (question, answer) in enumerate(QA):
        rows.append({"question": _judge_request(question, answer), "answer": "9"})
        rows.append(
            {"question": _judge_request(question, QA[(index + 3) % len(QA)][1]), "answer": "2"}
        )
    _write_jsonl(workdir / "teacher-train.jsonl", rows)
    recipe = workdir / "teacher.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        # Run: still run teacher.yaml
        kind: finetune
        name: teacher
        output_dir: {workdir / "runs"}
        model: {{ref: "{tiny_model_dir}"}}
        method: full
        data:
          train: {{path: teacher-train.jsonl, format: instruction, prompt: question,
            response: answer}}
          max_len: 128
        train: {{lr: 1.0e-2, batch_size: 24, max_steps: 80, warmup_ratio: 0.0, scheduler: constant,
          seed: 0}}
        """)
    )
    assert cli.main(["run", str(recipe)]) == 0
    return workdir / "runs" / "teacher" / "model"


def _generate_recipe(workdir, teacher_dir, student_dir, name, generate):
    path = workdir / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        # Run: still generate {name}.yaml
        kind: distill
        name: {name}
        output_dir: {workdir / "runs"}
        teacher: {{ref: "{teacher_dir}"}}
        student: {{ref: "{student_dir}"}}
        data:
          train: {{path: qa.jsonl, format: instruction, prompt: question, response: answer}}
          max_len: 128
        """)
        + textwrap.dedent(generate)
    )
    return path


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _report(out):
    return json.loads(Path(f"{out}.report.json").read_text())


def test_teacher_written_data_round_trips_into_finetune(
    workdir, teacher_dir, tiny_model_dir, capsys
):
    recipe = _generate_recipe(
        workdir,
        teacher_dir,
        tiny_model_dir,
        "gen-exact",
        """\
        generate:
          out: gen/exact.jsonl
          temperature: 0
          max_new_tokens: 32
          batch_size: 3
          judge: {type: exact}
        """,
    )
    assert cli.main(["generate", str(recipe)]) == 0
    out = workdir / "gen" / "exact.jsonl"
    report = _report(out)
    assert report["prompts"] == len(QA) and report["samples"] == len(QA)
    assert report["kept"] + sum(report["dropped"].values()) == report["samples"]
    assert report["kept"] >= len(QA) // 2
    assert f"kept {report['kept']}" in capsys.readouterr().out
    references = dict(QA)
    rows = _rows(out)
    assert len(rows) == report["kept"]
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == references[user["content"]]  # the exact judge held
    for example in report["drop_examples"]:
        # Answers longer than 32 tokens were cut: each dropped one is a prefix of its reference.
        assert example["reason"] in ("truncated", "exact_mismatch")
        if example["reason"] == "truncated":
            question = QA[int(example["origin"].rsplit(":", 1)[1]) - 1][0]
            assert references[question].startswith(example["answer"])

    # The round trip: a plain finetune recipe trains on the teacher-written file.
    finetune = workdir / "student.yaml"
    finetune.write_text(
        textwrap.dedent(f"""\
        # Run: still run student.yaml
        kind: finetune
        name: student
        output_dir: {workdir / "runs"}
        model: {{ref: "{tiny_model_dir}"}}
        lora: {{r: 4, alpha: 8, dropout: 0.0}}
        data:
          train: {{path: gen/exact.jsonl, format: chat}}
          max_len: 64
        train: {{lr: 5.0e-3, batch_size: 4, max_steps: 2, warmup_ratio: 0.0, seed: 0}}
        """)
    )
    assert cli.main(["run", str(finetune)]) == 0
    run_dir = workdir / "runs" / "student"
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    losses = [row["loss"] for row in RunDir(run_dir).metrics() if "loss" in row]
    assert len(losses) == 2 and all(loss == loss and abs(loss) < float("inf") for loss in losses)

    # Refused without --force, the file untouched; replaced with it.
    before = out.read_bytes()
    assert cli.main(["generate", str(recipe), "generate.judge=null"]) == 2
    assert out.read_bytes() == before
    assert cli.main(["generate", str(recipe), "--force", "generate.judge=null"]) == 0
    assert _report(out)["kept"] >= report["kept"]


def test_model_judge_keeps_and_drops_by_score(workdir, teacher_dir, tiny_model_dir):
    recipe = _generate_recipe(
        workdir,
        teacher_dir,
        tiny_model_dir,
        "gen-judge",
        f"""\
        generate:
          out: gen/judged.jsonl
          temperature: 0
          max_new_tokens: 32
          judge: {{type: model, ref: "{teacher_dir}", prompt: {json.dumps(JUDGE_PROMPT)},
            min_score: 5}}
        """,
    )
    assert cli.main(["generate", str(recipe)]) == 0
    report = _report(workdir / "gen" / "judged.jsonl")
    judged = sum(report["judge_scores"].values())
    assert judged == report["samples"] - report["dropped"].get("truncated", 0) > 0
    # The teacher was taught to give its own right answers 9; the judge's score is parsed.
    assert report["judge_scores"] == {"9": judged} and report["kept"] == judged

    # Nobody reaches min_score 10: nothing is written, the report says why.
    assert (
        cli.main(
            [
                "generate",
                str(recipe),
                "--force",
                f"generate.out={workdir / 'gen' / 'none.jsonl'}",
                "generate.judge.min_score=10",
            ]
        )
        == 2
    )
    assert not (workdir / "gen" / "none.jsonl").exists()
    report = _report(workdir / "gen" / "none.jsonl")
    assert report["kept"] == 0 and report["dropped"]["judge_score_below_min"] == judged
    assert all(
        e["score"] == 9 for e in report["drop_examples"] if e["reason"] == "judge_score_below_min"
    )


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served_teacher(teacher_dir, workdir):
    """`transformers serve` (the [serving] extra) on localhost, pinned to the teacher."""
    port = _free_port()
    executable = Path(sys.executable).with_name("transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = open(workdir / "serve.log", "w")
    server = subprocess.Popen(
        [
            str(executable),
            "serve",
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            str(teacher_dir),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log_text = (workdir / "serve.log").read_text()[-2000:]
                raise RuntimeError(f"transformers serve did not start: {log_text}")
            time.sleep(0.5)
        yield f"{url}/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_endpoint_teacher_against_transformers_serve(
    workdir, teacher_dir, tiny_model_dir, served_teacher
):
    # max_new_tokens 30: no answer is exactly 29 tokens. transformers serve 5.24 reports
    # finish_reason "length" when the end-of-turn token is the max_tokens-th token, which the
    # client (seeing only text) counts as truncated, where local generation sees the stop.
    local = _generate_recipe(
        workdir,
        teacher_dir,
        tiny_model_dir,
        "gen-local",
        """\
        generate: {out: gen/local.jsonl, temperature: 0, max_new_tokens: 30}
        """,
    )
    remote = _generate_recipe(
        workdir,
        teacher_dir,
        tiny_model_dir,
        "gen-remote",
        f"""\
        generate:
          out: gen/remote.jsonl
          temperature: 0
          max_new_tokens: 30
          batch_size: 4
          endpoint: {{url: "{served_teacher}", model: "{teacher_dir}"}}
        """,
    )
    assert cli.main(["generate", str(local)]) == 0
    assert cli.main(["generate", str(remote)]) == 0
    # Greedy answers from the server are the local teacher's, truncation included.
    assert _rows(workdir / "gen" / "remote.jsonl") == _rows(workdir / "gen" / "local.jsonl")
    dropped = [
        _report(workdir / "gen" / f"{name}.jsonl")["dropped"] for name in ("remote", "local")
    ]
    assert dropped[0] == dropped[1] and dropped[0]  # some answers were cut, the same ones

    # Several samples per prompt: the server ignores `n`, so the client asks again.
    assert (
        cli.main(
            [
                "generate",
                str(remote),
                "--force",
                "generate.temperature=1.0",
                "generate.samples_per_prompt=3",
                "generate.keep_truncated=true",
            ]
        )
        == 0
    )
    report = _report(workdir / "gen" / "remote.jsonl")
    assert report["samples"] == 3 * len(QA)
    assert report["kept"] + sum(report["dropped"].values()) == report["samples"]

    # A judge through the endpoint: the same server scores the answers.
    judge = (
        f"{{type: model, endpoint: {{url: '{served_teacher}', model: '{teacher_dir}'}}, "
        f"prompt: {json.dumps(JUDGE_PROMPT)}, min_score: 5}}"
    )
    assert cli.main(["generate", str(remote), "--force", f"generate.judge={judge}"]) == 0
    report = _report(workdir / "gen" / "remote.jsonl")
    assert report["judge_scores"] == {"9": report["kept"]} and report["kept"] > 0


def test_endpoint_errors_are_one_line(workdir, teacher_dir, tiny_model_dir, served_teacher, capsys):
    recipe = _generate_recipe(
        workdir,
        teacher_dir,
        tiny_model_dir,
        "gen-bad",
        f"""\
        generate: {{out: gen/bad.jsonl, endpoint: {{url: "{served_teacher}", model: not-served}}}}
        """,
    )
    capsys.readouterr()
    assert cli.main(["generate", str(recipe)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"{served_teacher}/chat/completions: HTTP 400" in error and "not-served" in error
    assert not (workdir / "gen" / "bad.jsonl").exists()
