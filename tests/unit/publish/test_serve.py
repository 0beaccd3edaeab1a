"""`still serve`: the cascade answers with the student, defers to the teacher, streams, keeps a
bounded queue and survives an unreachable teacher, on a tiny student and a fake endpoint."""

import json
import socket
import threading
import time
import urllib.request

import pytest
import torch
from fake_endpoint import FakeEndpoint
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from publish.serve import Cascade, EndpointTeacher, build_app, read_cascade
from still.cli import main

MESSAGES = [{"role": "user", "content": "What does json.dumps do?"}]


def teacher_reply(request, headers):
    return {"choices": [{"message": {"content": "Serialize obj to a JSON str."}}]}


@pytest.fixture(scope="module")
def student(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def endpoint():
    fake = FakeEndpoint(200, teacher_reply)
    yield fake
    fake.close()


def settings(threshold):
    return {"signal": "mean_logprob", "direction": 1, "threshold": threshold,
            "max_new_tokens": 6, "stop": [], "teacher": "t", "student": "s"}  # fmt: skip


def client(student, teacher_url, threshold, on_teacher_error="student", max_queue=4):
    teacher = EndpointTeacher(teacher_url, "teacher", timeout_s=5)
    cascade = Cascade(settings(threshold), *student, teacher, on_teacher_error)
    return TestClient(build_app(cascade, max_queue=max_queue))


def closed_port_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def test_confident_student_answers_and_unsure_one_defers(student, endpoint):
    confident = client(student, endpoint.url, threshold=-1e9)  # never below
    reply = confident.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert reply.status_code == 200 and reply.headers["X-Still-Answered-By"] == "student"
    body = reply.json()
    assert body["object"] == "chat.completion" and body["still"]["answered_by"] == "student"
    assert body["still"]["confidence"] < 0 and not endpoint.requests
    unsure = client(student, endpoint.url, threshold=0.0)  # a log-prob is always below 0
    body = unsure.post("/v1/chat/completions", json={"messages": MESSAGES}).json()
    assert body["still"]["answered_by"] == "teacher" and body["still"]["deferred"]
    assert body["choices"][0]["message"]["content"] == "Serialize obj to a JSON str."
    assert endpoint.requests[0][2]["messages"] == MESSAGES  # the teacher sees the conversation


def test_streaming_sends_chunks_then_who_answered(student, endpoint):
    app = client(student, endpoint.url, threshold=0.0)
    with app.stream(
        "POST", "/v1/chat/completions", json={"messages": MESSAGES, "stream": True}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "Serialize obj to a JSON str."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["still"]["answered_by"] == "teacher"


def test_unreachable_teacher_answers_with_the_student_or_fails_fast(student):
    url = closed_port_url()
    survive = client(student, url, threshold=0.0)
    reply = survive.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert reply.status_code == 200
    info = reply.json()["still"]
    assert info["answered_by"] == "student" and info["deferred"]
    assert info["teacher_error"].startswith(f"cannot reach {url}/chat/completions")
    strict = client(student, url, threshold=0.0, on_teacher_error="fail")
    reply = strict.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert reply.status_code == 502
    assert "cannot reach" in reply.json()["error"]["message"]


def test_bad_requests_and_a_full_queue_are_refused(student, endpoint):
    app = client(student, endpoint.url, threshold=-1e9)
    assert app.post("/v1/chat/completions", json={"messages": []}).status_code == 400
    assert app.post("/v1/chat/completions", content=b"not json").status_code == 400
    assert app.post("/v1/chat/completions", json={"messages": [{"role": 1}]}).status_code == 400
    bad_max = {"messages": MESSAGES, "max_tokens": "many"}
    assert "max_tokens must be" in app.post("/v1/chat/completions", json=bad_max).text
    assert app.get("/health").json() == {"status": "ok"}
    slow = FakeEndpoint(200, lambda request, headers: time.sleep(1.0) or teacher_reply(0, 0))
    try:
        busy = client(student, slow.url, threshold=0.0, max_queue=1)
        first = threading.Thread(
            target=busy.post,
            args=("/v1/chat/completions",),
            kwargs={"json": {"messages": MESSAGES}},
        )
        first.start()
        deadline = time.monotonic() + 10
        while not slow.requests and time.monotonic() < deadline:  # the first holds the slot
            time.sleep(0.02)
        second = busy.post("/v1/chat/completions", json={"messages": MESSAGES})
        first.join()
        assert second.status_code == 503 and "queue full" in second.json()["error"]["message"]
    finally:
        slow.close()


def test_cascade_file_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"serve": None, "tasks": []}))
    with pytest.raises(Exception, match="has no serve section"):
        read_cascade(tmp_path / "c.json")
    assert main(["serve", str(tmp_path / "c.json")]) == 2
    assert capsys.readouterr().err.startswith("still: error: ")
    (tmp_path / "ok.json").write_text(json.dumps({"serve": settings(0.0)}))
    assert main(["serve", str(tmp_path / "ok.json"), "--teacher-url", "localhost:1"]) == 2
    assert "--teacher-url localhost:1: " in capsys.readouterr().err


def test_still_serve_over_real_http_with_uvicorn(student, endpoint):
    """The app under uvicorn itself, as `still serve` runs it, answered over a socket."""
    import uvicorn

    teacher = EndpointTeacher(endpoint.url, "teacher", timeout_s=5)
    app = build_app(Cascade(settings(0.0), *student, teacher, "student"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps({"messages": MESSAGES}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.loads(response.read())
        assert body["still"]["answered_by"] == "teacher"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.slow
def test_defers_to_a_real_transformers_serve_teacher(student, tiny_model_dir_4layers, tmp_path):
    """The deferral target is `transformers serve` (the [serving] extra) on localhost, as for
    sequence-level KD; its greedy answer is the local teacher's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from publish.serve import Decoding, LocalTeacher

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    executable = Path(sys.executable).with_name("transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [str(executable), "serve", "--device", "cpu", "--host", "127.0.0.1", "--port",
               str(port), "--dtype", "float32", str(tiny_model_dir_4layers)]  # fmt: skip
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as up:
                    if up.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (
                tmp_path / "serve.log"
            ).read_text()[-2000:]
            time.sleep(0.5)
        teacher = EndpointTeacher(f"http://127.0.0.1:{port}/v1", str(tiny_model_dir_4layers), 60)
        app = TestClient(build_app(Cascade(settings(0.0), *student, teacher, "fail")))
        body = app.post("/v1/chat/completions", json={"messages": MESSAGES}).json()
        assert body["still"]["answered_by"] == "teacher"
        local = LocalTeacher(str(tiny_model_dir_4layers)).answer(MESSAGES, Decoding(6, []))
        assert body["choices"][0]["message"]["content"] == local
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
