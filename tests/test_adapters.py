"""Protocol adapters: the real `ollama` and `openai` clients, `/generate` and the OpenAI routes
without `/v1`, against one mvtui in front of `mvtui sim` servers; adapters from entry points."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any
from unittest import mock

import ollama
import openai
import pytest

from mvtui.router.adapters import generate as generate_adapter
from mvtui.router.adapters import ollama as ollama_adapter
from mvtui.router.adapters.base import ENTRY_POINT_GROUP, AdapterError, FrontDoorClient, loopback_url
from mvtui.router.adapters.registry import adapter_routes
from tests import http
from tests.helpers import REPO_ROOT, Proc, free_port, start_mvtui, start_sim, wait_until
from tests.router_setup import metric, start_router, wait_healthy, write_config

KEY = "adapter-test-key"
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, Proc]]:
    """`llama` and `qwen`, and `cut`, whose answers break after two tokens."""
    fast = ["--tokens-per-s", "400", "--ttft-ms", "5"]
    started: dict[str, Proc] = {}
    try:
        for model, extra in (("llama", []), ("qwen", []), ("cut", ["--cut-after-tokens", "2"])):
            started[model] = start_sim(model, extra=[*fast, *extra])
        yield started
    finally:
        for sim in started.values():
            sim.stop()


@pytest.fixture(scope="module")
def router(sims: dict[str, Proc], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    config = write_config(tmp_path_factory.mktemp("adapters") / "servers.toml", [sim.url for sim in sims.values()])
    proc = start_router(config)
    try:
        wait_healthy(proc, len(sims))
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def keyed_router(sims: dict[str, Proc], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """The same servers behind a router that asks for a key."""
    path = tmp_path_factory.mktemp("keyed") / "servers.toml"
    config = write_config(path, [sims["llama"].url], f'[router]\napi_keys = ["{KEY}"]\n')
    proc = start_router(config)
    try:
        wait_healthy(proc, 1, key=KEY)
        yield proc
    finally:
        proc.stop()


def ollama_client(router: Proc, **options: Any) -> ollama.Client:
    return ollama.Client(host=router.url, timeout=30, **options)


def openai_client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=30)


def ndjson(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def sse_events(body: bytes) -> list[Any]:
    data = [line[len("data: ") :] for line in body.decode().splitlines() if line.startswith("data: ")]
    return [text if text == "[DONE]" else json.loads(text) for text in data]


# --- the ollama client ---------------------------------------------------------------------


def test_ollama_lists_the_cluster_models(router: Proc) -> None:
    listed = ollama_client(router).list()
    assert {model.model for model in listed.models} == {"llama", "qwen", "cut"}
    assert all(model.digest and model.details is not None for model in listed.models)


def test_ollama_chat_not_streamed_has_ollama_fields_and_statistics(router: Proc) -> None:
    before = metric(router, "mvtui_requests_total", model="llama", status="200")
    answer = ollama_client(router).chat(model="llama", messages=CHAT, options={"num_predict": 5, "seed": 11})
    assert answer.done is True and answer.done_reason == "length"
    assert answer.message.role == "assistant" and answer.message.content
    assert answer.model == "llama" and answer.created_at
    assert answer.eval_count == 5 and answer.prompt_eval_count and answer.prompt_eval_count > 0
    assert answer.total_duration and answer.total_duration >= (answer.eval_duration or 0) >= 0
    assert answer.load_duration == 0
    # the adapter's request went through the router's own OpenAI route: counted there, once the
    # router's handler has finished (just after the last byte the adapter read)
    counted = lambda: metric(router, "mvtui_requests_total", model="llama", status="200")  # noqa: E731
    wait_until(lambda: counted() >= before + 1, timeout=10, what="the request counted by the router")
    assert counted() == before + 1


def test_ollama_chat_streamed_is_the_same_answer_in_pieces(router: Proc) -> None:
    client = ollama_client(router)
    options = {"num_predict": 6, "seed": 12}
    whole = client.chat(model="llama", messages=CHAT, options=options)
    chunks = list(client.chat(model="llama", messages=CHAT, options=options, stream=True))
    assert len(chunks) > 2
    assert [chunk.done for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(chunk.message.content or "" for chunk in chunks) == whole.message.content
    last = chunks[-1]
    assert last.eval_count == 6 and last.done_reason == "length" and last.total_duration
    # and the openai client gets the same answer from the same mvtui
    same = openai_client(router.url + "/v1").chat.completions.create(model="llama", messages=CHAT, max_tokens=6, seed=12)  # type: ignore[arg-type]
    assert same.choices[0].message.content == whole.message.content


def test_ollama_generate_streamed_and_not(router: Proc) -> None:
    client = ollama_client(router)
    options = {"num_predict": 4, "seed": 13, "temperature": 0.2}
    whole = client.generate(model="qwen", prompt="Why is the sky blue?", system="Be brief.", options=options)
    assert whole.done and whole.response and whole.eval_count == 4 and whole.model == "qwen"
    chunks = list(client.generate(model="qwen", prompt="Why is the sky blue?", system="Be brief.", options=options, stream=True))
    assert "".join(chunk.response or "" for chunk in chunks) == whole.response
    assert chunks[-1].done and chunks[-1].prompt_eval_count == whole.prompt_eval_count


def test_ollama_generate_raw_is_a_text_completion(router: Proc) -> None:
    raw = ollama_client(router).generate(model="llama", prompt="Once upon a time", raw=True, options={"num_predict": 3})
    text = openai_client(router.url + "/v1").completions.create(model="llama", prompt="Once upon a time", max_tokens=3)
    assert text.usage is not None and raw.prompt_eval_count == text.usage.prompt_tokens  # no chat template around it


def test_ollama_streams_unless_told_not_to(router: Proc) -> None:
    answer = http.post(router.url + "/api/chat", json={"model": "llama", "messages": CHAT, "options": {"num_predict": 3}})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/x-ndjson")
    lines = ndjson(answer.content)
    assert len(lines) == 4 and lines[-1]["done"] is True and not any(line["done"] for line in lines[:-1])
    assert {"eval_count", "prompt_eval_count", "total_duration", "load_duration", "eval_duration", "prompt_eval_duration"} <= set(lines[-1])


def test_ollama_load_requests_answer_at_once(router: Proc) -> None:
    """A generate with no prompt, or a chat with no messages, is how Ollama's clients load a model."""
    loaded = ollama_client(router).generate(model="llama")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    answer = http.post(router.url + "/api/chat", json={"model": "qwen", "messages": []})
    assert answer.json()["done_reason"] == "load" and answer.json()["message"]["content"] == ""
    unknown = http.post(router.url + "/api/generate", json={"model": "nope"})
    assert unknown.status_code == 404 and unknown.json() == {"error": "model 'nope' not found"}


def test_ollama_ps_show_and_version(router: Proc) -> None:
    client = ollama_client(router)
    running = {model.model: model for model in client.ps().models}
    assert set(running) == {"llama", "qwen", "cut"}
    assert running["llama"].context_length == 4096 and running["llama"].expires_at is not None
    raw = http.get(router.url + "/api/ps").json()["models"]
    assert all(entry["state"] == "running" and len(entry["servers"]) == 1 for entry in raw)
    shown = client.show("qwen")
    assert shown.modelinfo is not None and shown.modelinfo["vllm.context_length"] == 4096
    assert shown.capabilities == ["completion"]
    assert http.get(router.url + "/api/version").json()["version"]


def test_ollama_errors_are_in_ollama_shape(router: Proc) -> None:
    client = ollama_client(router)
    with pytest.raises(ollama.ResponseError) as unknown:
        client.chat(model="nope", messages=CHAT)
    assert unknown.value.status_code == 404 and "nope" in unknown.value.error
    with pytest.raises(ollama.ResponseError) as streamed:
        list(client.generate(model="nope", prompt="hi", stream=True))
    assert streamed.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("nope")
    assert missing.value.status_code == 404
    for body, status in (
        (b"{not json", 400),
        (b'{"messages": []}', 400),
        (b'{"model": "llama", "options": 3, "messages": [{"role": "user"}]}', 400),
    ):
        answer = http.post(router.url + "/api/chat", content=body)
        assert answer.status_code == status and isinstance(answer.json()["error"], str), answer.text


def test_a_broken_answer_is_an_ollama_error(router: Proc) -> None:
    """`cut` drops its connection after two tokens: an error line after the first pieces, or
    an error status when nothing was sent yet; never a complete-looking answer."""
    client = ollama_client(router)
    with pytest.raises(ollama.ResponseError):
        list(client.chat(model="cut", messages=CHAT, options={"num_predict": 8}, stream=True))
    with pytest.raises(ollama.ResponseError) as whole:
        client.chat(model="cut", messages=CHAT, options={"num_predict": 8})
    assert whole.value.status_code >= 500
    answer = http.post(router.url + "/generate", json={"model": "cut", "prompt": "hi", "max_tokens": 8, "stream": True})
    if answer.status_code != 200:  # it failed before the stream began
        assert answer.status_code >= 500 and answer.json()["error"]["message"]
        return
    events = sse_events(answer.content)
    assert "[DONE]" not in events and any(isinstance(event, dict) and "error" in event for event in events)


def test_ollama_client_with_and_without_a_key(keyed_router: Proc) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        ollama_client(keyed_router).list()
    assert refused.value.status_code == 401
    with pytest.raises(ollama.ResponseError):
        ollama_client(keyed_router).chat(model="llama", messages=CHAT)
    keyed = ollama_client(keyed_router, headers={"Authorization": f"Bearer {KEY}"})
    assert [model.model for model in keyed.list().models] == ["llama"]
    assert keyed.chat(model="llama", messages=CHAT, options={"num_predict": 2}).eval_count == 2
    assert [model.model for model in keyed.ps().models] == ["llama"]
    answer = http.post(keyed_router.url + "/generate", json={"prompt": "hi", "max_tokens": 2}, headers={"x-api-key": KEY})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2


# --- OpenAI without /v1 ----------------------------------------------------------------------


def test_openai_routes_without_v1(router: Proc) -> None:
    plain, versioned = openai_client(router.url), openai_client(router.url + "/v1")
    chat = plain.chat.completions.create(model="qwen", messages=CHAT, max_tokens=4, seed=5)  # type: ignore[arg-type]
    same = versioned.chat.completions.create(model="qwen", messages=CHAT, max_tokens=4, seed=5)  # type: ignore[arg-type]
    assert chat.choices[0].message.content == same.choices[0].message.content
    text = plain.completions.create(model="llama", prompt="hello", max_tokens=3)
    assert text.usage is not None and text.usage.completion_tokens == 3
    streamed = plain.chat.completions.create(model="llama", messages=CHAT, max_tokens=3, stream=True)  # type: ignore[arg-type]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert {"llama", "qwen"} <= {model.id for model in plain.models.list()}


# --- /generate -------------------------------------------------------------------------------


def test_generate_answers_text_model_and_usage(router: Proc) -> None:
    asked = {"model": "llama", "prompt": "And then?", "max_tokens": 4, "seed": 21, "temperature": 0.5}
    bare = http.post(router.url + "/generate", json=asked)
    assert bare.status_code == 200, bare.text
    body = bare.json()
    assert body["text"] and body["model"] == "llama" and body["usage"]["completion_tokens"] == 4
    history = {"system_info": "You are terse.", "history_input": ["Hello", "Tell me a story"], "history_output": ["Hi", "Once..."]}
    longer = http.post(router.url + "/generate", json={**asked, **history}).json()
    assert longer["usage"]["prompt_tokens"] > body["usage"]["prompt_tokens"]  # the history was sent
    assert longer["text"] == body["text"]  # same seed, same answer: only the prompt grew


def test_generate_streams_text_deltas(router: Proc) -> None:
    asked = {"model": "qwen", "prompt": "Go on", "max_tokens": 5, "seed": 22}
    whole = http.post(router.url + "/generate", json=asked).json()
    answer = http.post(router.url + "/generate", json={**asked, "stream": True})
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = sse_events(answer.content)
    assert events[-1] == "[DONE]"
    deltas, last = events[:-2], events[-2]
    assert len(deltas) == 5 and all(set(event) == {"text"} for event in deltas)
    assert "".join(event["text"] for event in deltas) == whole["text"]
    assert last["usage"]["completion_tokens"] == 5 and last["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("inputs", "outputs", "short"),
    [(["a", "b"], ["x"], "history_output"), (["a"], ["x", "y", "z"], "history_input"), (["a"], [], "history_output")],
)
def test_generate_with_mismatched_history_is_a_400_naming_the_short_list(
    router: Proc, inputs: list[str], outputs: list[str], short: str
) -> None:
    answer = http.post(
        router.url + "/generate", json={"model": "llama", "prompt": "hi", "history_input": inputs, "history_output": outputs}
    )
    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert message.startswith(f"`{short}` is short") and f"history_input has {len(inputs)} item" in message


def test_generate_bad_requests(router: Proc) -> None:
    for body in (
        {"model": "llama"},
        {"prompt": 3},
        {"prompt": "hi", "history_input": "a", "history_output": "b"},
        {"prompt": "hi", "system_info": 1},
    ):
        answer = http.post(router.url + "/generate", json=body)
        assert answer.status_code == 400 and answer.json()["error"]["message"], body
    assert http.post(router.url + "/generate", json={"model": "nope", "prompt": "hi"}).status_code == 404


# --- the translations, without processes ------------------------------------------------------


def test_generate_builds_the_conversation_in_order() -> None:
    payload = generate_adapter.chat_payload(
        {"prompt": "p", "system_info": "s", "history_input": ["i1", "i2"], "history_output": ["o1", "o2"], "top_k": 5, "stream": True}
    )
    roles = [(message["role"], message["content"]) for message in payload["messages"]]
    assert roles == [("system", "s"), ("user", "i1"), ("assistant", "o1"), ("user", "i2"), ("assistant", "o2"), ("user", "p")]
    assert payload["top_k"] == 5 and "stream" not in payload and "history_input" not in payload


def test_ollama_options_become_sampling_fields() -> None:
    options = {
        "temperature": 0.1,
        "top_p": 0.9,
        "top_k": 4,
        "num_predict": 7,
        "stop": ["\n"],
        "seed": 3,
        "repeat_penalty": 1.1,
        "num_ctx": 8192,
    }
    assert ollama_adapter.sampling(options) == {
        "temperature": 0.1,
        "top_p": 0.9,
        "top_k": 4,
        "max_tokens": 7,
        "stop": ["\n"],
        "seed": 3,
        "repetition_penalty": 1.1,
    }
    assert ollama_adapter.sampling({"num_predict": -1}) == {}
    assert ollama_adapter.response_format("json") == {"response_format": {"type": "json_object"}}
    assert ollama_adapter.response_format({"type": "object"})["response_format"]["json_schema"]["schema"] == {"type": "object"}
    with pytest.raises(AdapterError):
        ollama_adapter.sampling([1])


def test_ollama_messages_with_images_and_tools() -> None:
    messages = [
        {"role": "user", "content": "what is this?", "images": ["iVBORw0KGgo="]},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "look", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "a cat", "tool_name": "look"},
    ]
    user, assistant, tool = ollama_adapter.openai_messages(messages)
    assert user["content"][1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    call = assistant["tool_calls"][0]
    assert call["function"] == {"name": "look", "arguments": '{"x": 1}'} and call["type"] == "function"
    assert tool["tool_call_id"] == call["id"]


def test_loopback_url_reaches_the_bound_address() -> None:
    assert loopback_url("0.0.0.0", 1) == "http://127.0.0.1:1"
    assert loopback_url("::", 1) == "http://[::1]:1"
    assert loopback_url("10.0.0.2", 1) == "http://10.0.0.2:1"
    assert loopback_url("fd00::2", 1) == "http://[fd00::2]:1"


# --- adapters from entry points ---------------------------------------------------------------

PLUGIN = '''
from aiohttp import web

from mvtui.router.adapters.base import CHAT_PATH, AdapterError


class ShoutAdapter:
    """POST /shout {"model", "say"}: the model's answer, in capitals."""

    name = "shout"

    def routes(self, door):
        async def shout(request):
            try:
                body = await door.read_json(request)
                payload = {"model": body["model"], "messages": [{"role": "user", "content": body["say"]}], "max_tokens": 3}
                async with door.stream(request, CHAT_PATH, payload) as answer:
                    whole = await answer.collect()
            except AdapterError as error:
                return web.json_response({"oops": error.message}, status=error.status)
            return web.json_response({"shout": whole.text.upper(), "tokens": answer.completion_tokens})

        return [web.post("/shout", shout), web.get("/api/tags", shout)]


def broken():
    raise RuntimeError("this plugin is broken")
'''


def install_plugin(folder: Path) -> Path:
    """A module and the dist-info that declares it in the `mvtui.adapters` group, as pip would."""
    folder.mkdir(exist_ok=True)
    (folder / "shout_plugin.py").write_text(PLUGIN)
    info = folder / "shout_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nshout = shout_plugin:ShoutAdapter\nbroken = shout_plugin:broken\n")
    return folder


def test_the_registry_adds_entry_point_adapters_and_leaves_out_the_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.syspath_prepend(str(install_plugin(tmp_path)))
    found = [
        EntryPoint("shout", "shout_plugin:ShoutAdapter", ENTRY_POINT_GROUP),
        EntryPoint("broken", "shout_plugin:broken", ENTRY_POINT_GROUP),
        EntryPoint("missing", "no_such_module:Adapter", ENTRY_POINT_GROUP),
    ]
    door = FrontDoorClient(mock.Mock(), lambda: "http://127.0.0.1:1", mock.Mock())
    with caplog.at_level(logging.WARNING, logger="mvtui.router.adapters.registry"):
        routes = adapter_routes(door, [], found)
    served = {(route.method, route.path) for route in routes}
    assert {("POST", "/generate"), ("POST", "/api/chat"), ("GET", "/api/tags"), ("POST", "/shout")} <= served
    assert [route.path for route in routes].count("/api/tags") == 1  # the built-in one: the plugin's is left out
    log = caplog.text
    assert "broken" in log and "no_such_module" in log and "/api/tags is served already" in log


def test_an_installed_adapter_package_serves_through_the_router(sims: dict[str, Proc], tmp_path: Path) -> None:
    """A real router process that finds the plugin through importlib.metadata."""
    plugin = install_plugin(tmp_path / "site")
    config = write_config(tmp_path / "servers.toml", [sims["llama"].url])
    port = free_port()
    env = {"PYTHONPATH": os.pathsep.join([str(plugin), str(REPO_ROOT)])}
    router = start_mvtui(["--no-ui", "--config", str(config), "--port", str(port), "--host", "127.0.0.1"], port=port, env=env)
    try:
        wait_healthy(router, 1)
        answer = http.post(router.url + "/shout", json={"model": "llama", "say": "hello"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["shout"].isupper() and answer.json()["tokens"] == 3
        assert http.post(router.url + "/shout", json={"model": "nope", "say": "hi"}).status_code == 404
        assert "adapter broken" in router.log_tail(200)
    finally:
        router.stop()
