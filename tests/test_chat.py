"""`make chat` driven through stdin on a registered tiny adapter (each turn through the chat template, the conversation
carried, /reset and /system), `--prompt` for scripts, and `make serve`: the registered pyfunc behind a real HTTP server
answering a zh prompt, its signature refusing a bad request."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlflow
import pytest

from pipeline import chat, prepare, sft
from pipeline.core.strict import parse_overrides
from pipeline.stage.resolve import resolve

MODEL = "zh-align-sft@candidate"
GREEDY = ["--hw", "cpu", "--temperature", "0", "--repetition-penalty", "1"]


@pytest.fixture(scope="module")
def registered(module_store):
    """prepare and 2 sft steps on the tiny model: a real adapter registered as zh-align-sft@candidate."""
    tmp = module_store
    assert prepare.main(["--hw", "cpu", "--dry-run", "false", "--set", f"output_dir={tmp / 'data'}"]) == 0
    result = sft.run(resolve("sft", hw="cpu", overrides=parse_overrides([
        f"data.path={tmp / 'data'}", f"output_dir={tmp / 'sft'}", "train.max_steps=2", "train.lr=1e-2",
        "hw.micro_batch=4", "hw.grad_accum=1", "train.eval_steps=100", "train.save_steps=100"])))
    return {"tmp": tmp, "adapter": result.adapter, "uri": f"sqlite:///{tmp / 'mlflow.db'}"}


def greedy_pyfunc(prompt: str, max_new_tokens: int) -> str:
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}")
    return model.predict({"prompt": [prompt]}, params={"max_new_tokens": max_new_tokens})[0]


def test_turns_reach_the_model_through_the_chat_template(registered, monkeypatch, capsys):
    lines = ["你好", "请再说一遍。", "/reset", "长江有多长？", "/system 你是一只猫。", "喵？", "/exit", "never read"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert chat.main(["--model", MODEL, *GREEDY, "--max-new-tokens", "6", "--show-template"]) == 0
    out, err = capsys.readouterr()
    rendered = [line.removeprefix("[template] ").replace("\\n", "\n") for line in err.splitlines()
                if line.startswith("[template] ")]
    assert len(rendered) == 4  # four user turns; nothing after /exit
    zh = "<|im_start|>system\n你是一个乐于助人"
    first, second, third, fourth = rendered
    assert first.startswith(zh) and first.endswith("<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")
    # the second turn carries the first exchange: the first render, the model's reply, then the new question
    assert second.startswith(first) and second.endswith("<|im_start|>user\n请再说一遍。<|im_end|>\n<|im_start|>assistant\n")
    reply = second[len(first):].split("<|im_end|>", 1)[0]
    assert reply.strip() and reply.strip() in out
    assert third.startswith(zh) and "你好" not in third and "请再说一遍" not in third  # /reset forgot them
    assert "你是一只猫。" in fourth and "你是一个乐于助人" not in fourth and "长江" not in fourth  # /system
    assert "conversation cleared" in out and "已设置系统提示: 你是一只猫。" in out


def test_prompt_answers_once_as_the_registered_model_does(registered, capsys):
    assert chat.main(["--model", MODEL, *GREEDY, "--max-new-tokens", "12", "--prompt", "你好，请介绍一下你自己。"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer and answer == greedy_pyfunc("你好，请介绍一下你自己。", 12)  # same adapter, system prompt, decoding


def test_a_folder_a_wrong_base_and_bad_settings(registered, capsys, caplog):
    assert chat.main(["--model", registered["adapter"], *GREEDY, "--max-new-tokens", "4", "--prompt", "你好"]) == 0
    assert capsys.readouterr().out.strip()
    assert chat.main(["--model", MODEL, "--hw", "cpu", "--set", "model=tiny-qwen2.5", "--prompt", "你好"]) == 1
    assert "is an adapter of base 'tiny-qwen2" in capsys.readouterr().err  # the model named is not its base
    # no model named, a profile whose model is another (HW=4090: Qwen2.5-7B): the adapter's own base, said in the log
    caplog.set_level("INFO", logger="pipeline.chat")
    assert chat.main(["--model", MODEL, *GREEDY[2:], "--hw", "4090", "--max-new-tokens", "4", "--prompt", "你好"]) == 0
    assert capsys.readouterr().out.strip() and "is an adapter of tiny-qwen2: loaded on that model definition" in caplog.text
    assert chat.main(["--model", MODEL, "--hw", "cpu", "--temperature", "-1", "--top-p", "0"]) == 2
    err = capsys.readouterr().err
    assert "--temperature (TEMPERATURE) must be 0 (greedy) or more" in err and "--top-p (TOP_P)" in err
    assert chat.main(["--model", "zh-align-sft@nope", "--hw", "cpu"]) == 2
    assert "aliases of zh-align-sft: candidate" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body, ensure_ascii=False).encode("utf-8"),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_serve_answers_a_zh_prompt_over_http(registered):
    port = _free_port()
    here = os.path.dirname(sys.executable)  # MLflow starts `uvicorn` from PATH, as under `make serve`
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "PATH": here + os.pathsep + os.environ["PATH"]}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}",
                               "--host", "127.0.0.1", "--port", str(port), "--env-manager", "local"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /ping within 180 s"
            time.sleep(1)
        status, body = _post(f"{base}/invocations", {"inputs": {"prompt": ["你好，请介绍一下你自己。"]},
                                                     "params": {"max_new_tokens": 12, "temperature": 0.0}})
        assert status == 200, body
        (text,) = body["predictions"]
        assert text and text == greedy_pyfunc("你好，请介绍一下你自己。", 12)
        status, body = _post(f"{base}/invocations", {"dataframe_records": [
            {"messages": [{"role": "user", "content": "长江有多长？"}]}], "params": {"max_new_tokens": 4}})
        assert status == 200 and len(body["predictions"]) == 1
        status, body = _post(f"{base}/invocations", {"inputs": {"prompt": ["你好"]},
                                                     "params": {"max_new_tokens": "many"}})
        assert status == 400 and "max_new_tokens" in json.dumps(body)  # the signature's params are validated
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    """The server and its uvicorn worker: their process group, by the server's pid."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
