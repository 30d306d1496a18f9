"""`mvtui models`, `mvtui pull` and `mvtui assign`: a real Hugging Face cache filled by real
`mvtui pull` processes from a stand-in hub on loopback (tests/hub.py, through HF_ENDPOINT),
and real config files. No test reaches the internet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomlkit

from mvtui.config.edit import find_instance, instance_text, set_instance
from mvtui.config.schema import InstanceConfig, parse_config
from mvtui.errors import ConfigEditError
from mvtui.models.kinds import CLASSIFICATION, EMBEDDING, GENERATION, UNKNOWN, model_kind
from mvtui.models.names import near_names, unknown_model
from tests.helpers import REPO_ROOT, free_port, wait_until
from tests.hub import FakeHub, Repo

CHAT_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
EMBED_CONFIG = {"architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta"}
WEIGHTS = bytes(range(256)) * 1200  # 300 KiB: several reads, so a stall or a cut lands midway
CHAT = Repo("acme/tiny-chat", {"config.json": json.dumps(CHAT_CONFIG).encode(), "model.safetensors": WEIGHTS, "tokenizer.json": b"{}"})
EMBED = Repo(
    "acme/tiny-embed",
    {"config.json": json.dumps(EMBED_CONFIG).encode(), "modules.json": b"[]", "model.safetensors": WEIGHTS[:5000]},
)
BIG = Repo("acme/big", {"config.json": json.dumps(CHAT_CONFIG).encode(), "README.md": b"# big\n", "model.safetensors": WEIGHTS * 4})
MIB = 1024**2
HUGE = Repo("acme/huge", {"model.safetensors": bytes(range(256)) * (21 * MIB // 256)})  # huggingface_hub reads 10 MiB at a time


def hub_env(home: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(
        {
            "PYTHONPATH": str(REPO_ROOT),
            "HF_HOME": str(home),
            "HF_ENDPOINT": endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_ETAG_TIMEOUT": "30",
        }
    )
    env.update(extra)
    return env


def mvtui(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mvtui", *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def pulled(env: dict[str, str], model: str) -> None:
    done = mvtui(env, "pull", model)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    with FakeHub([CHAT, EMBED]).running() as running:
        yield running


@pytest.fixture(scope="module")
def cache(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF_HOME with both models pulled."""
    home = tmp_path_factory.mktemp("hf")
    pulled(hub_env(home, hub.url), CHAT.repo_id)
    pulled(hub_env(home, hub.url), EMBED.repo_id)
    return home


def snapshot(home: Path, repo: Repo) -> Path:
    return home / "hub" / f"models--{repo.repo_id.replace('/', '--')}" / "snapshots" / repo.commit


# --- mvtui pull ------------------------------------------------------------------------------------


def test_pull_downloads_the_snapshot_through_the_hub_routes(hub: FakeHub, tmp_path: Path) -> None:
    before = len(hub.seen)
    done = mvtui(hub_env(tmp_path, hub.url), "pull", CHAT.repo_id, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["commit"] == CHAT.commit and result["files"] == 3
    assert result["size_on_disk"] == sum(len(data) for data in CHAT.files.values())
    for name, data in CHAT.files.items():
        assert (snapshot(tmp_path, CHAT) / name).read_bytes() == data
    paths = {(seen.method, seen.path.rsplit("/", 1)[-1] if "/resolve/" in seen.path else seen.path) for seen in hub.seen[before:]}
    assert ("GET", f"/api/models/{CHAT.repo_id}/revision/main") in paths
    assert {("HEAD", name) for name in CHAT.files} | {("GET", name) for name in CHAT.files} <= paths
    assert "Fetching 3 files" in done.stderr  # the progress bar


def test_pull_again_downloads_nothing(hub: FakeHub, cache: Path) -> None:
    before = len(hub.seen)
    done = mvtui(hub_env(cache, hub.url), "pull", CHAT.repo_id)
    assert done.returncode == 0, done.stderr
    assert [seen for seen in hub.seen[before:] if "/resolve/" in seen.path and seen.method == "GET"] == []
    assert done.stdout.splitlines()[-1].startswith(f"{CHAT.repo_id} {CHAT.commit[:12]}: 3 files")


def test_an_interrupted_pull_resumes_with_the_files_it_lacks(tmp_path: Path) -> None:
    """Ctrl-C while the weights stream (the small files are done): exit 130; run again: the
    finished files are not fetched again, the weights are, and the snapshot is complete."""
    with FakeHub([BIG], stall_after={"model.safetensors": 100_000}).running() as hub:
        env = hub_env(tmp_path, hub.url)
        pull = subprocess.Popen(
            [sys.executable, "-m", "mvtui", "pull", BIG.repo_id],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            small_ones_done = lambda: all((snapshot(tmp_path, BIG) / name).exists() for name in ("config.json", "README.md"))  # noqa: E731
            wait_until(lambda: hub.stalled.is_set() and small_ones_done(), timeout=60, what="the weights stalled midway")
            pull.send_signal(signal.SIGINT)
            _, stderr = pull.communicate(timeout=60)
        finally:
            pull.kill()
        assert pull.returncode == 130 and "interrupted; run it again to resume acme/big" in stderr
        assert not (snapshot(tmp_path, BIG) / "model.safetensors").exists()
        hub.release()
        before = len(hub.seen)
        done = mvtui(env, "pull", BIG.repo_id)
        assert done.returncode == 0, done.stderr
        fetched = [seen.path.rsplit("/", 1)[-1] for seen in hub.seen[before:] if seen.method == "GET" and "/resolve/" in seen.path]
        assert fetched == ["model.safetensors"]
        assert (snapshot(tmp_path, BIG) / "model.safetensors").read_bytes() == BIG.files["model.safetensors"]


def test_a_connection_cut_midway_resumes_from_where_it_stopped(tmp_path: Path) -> None:
    """Within one run: the rest of the file is asked for with a Range from what was written
    (huggingface_hub writes 10 MiB at a time), not the whole file again."""
    with FakeHub([HUGE], cut_after={"model.safetensors": 15 * MIB}).running() as hub:
        done = mvtui(hub_env(tmp_path, hub.url), "pull", HUGE.repo_id)
        assert done.returncode == 0, done.stderr
        ranges = [seen.range for seen in hub.gets("model.safetensors")]
    assert ranges == [None, f"bytes={10 * MIB}-"]
    assert (snapshot(tmp_path, HUGE) / "model.safetensors").read_bytes() == HUGE.files["model.safetensors"]


def test_an_unreachable_hub_is_named_with_hf_hub_offline(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = mvtui(hub_env(tmp_path, endpoint), "pull", CHAT.repo_id)
    assert done.returncode == 1
    assert f"cannot reach the Hugging Face hub at {endpoint}" in done.stderr and "HF_HUB_OFFLINE" in done.stderr
    offline = mvtui(hub_env(tmp_path, endpoint, HF_HUB_OFFLINE="1"), "pull", CHAT.repo_id)
    assert offline.returncode == 1
    assert f"HF_HUB_OFFLINE is set, so nothing is downloaded from {endpoint}" in offline.stderr
    assert "Traceback" not in done.stderr + offline.stderr


def test_an_unknown_model_or_revision_says_so(hub: FakeHub, tmp_path: Path) -> None:
    env = hub_env(tmp_path, hub.url)
    missing = mvtui(env, "pull", "acme/nope")
    assert missing.returncode == 1 and f"no model 'acme/nope' on {hub.url}" in missing.stderr
    revision = mvtui(env, "pull", CHAT.repo_id, "--revision", "v9")
    assert revision.returncode == 1 and f"acme/tiny-chat has no revision 'v9' on {hub.url}" in revision.stderr


# --- mvtui models ----------------------------------------------------------------------------------


def listed(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = mvtui(env, "models", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_models_lists_the_cache_with_kinds_sizes_and_revisions(cache: Path) -> None:
    found = listed(hub_env(cache, "http://127.0.0.1:9"))
    assert found["cache_dir"] == str(cache / "hub")
    models = {model["repo_id"]: model for model in found["models"]}
    assert set(models) == {CHAT.repo_id, EMBED.repo_id}
    chat, embed = models[CHAT.repo_id], models[EMBED.repo_id]
    assert (chat["kind"], embed["kind"]) == (GENERATION, EMBEDDING)
    assert chat["revision"] == CHAT.commit and chat["refs"] == ["main"] and chat["date"]
    assert chat["size_on_disk"] == sum(len(data) for data in CHAT.files.values())


def test_models_honours_hf_hub_cache_and_hf_home(cache: Path, tmp_path: Path) -> None:
    moved = hub_env(tmp_path / "elsewhere", "http://127.0.0.1:9", HF_HUB_CACHE=str(cache / "hub"))
    assert {model["repo_id"] for model in listed(moved)["models"]} == {CHAT.repo_id, EMBED.repo_id}
    empty = mvtui(hub_env(tmp_path / "empty", "http://127.0.0.1:9"), "models")
    assert empty.returncode == 0 and f"no Hugging Face cache at {tmp_path / 'empty' / 'hub'} yet" in empty.stdout


def test_models_names_the_config_entries_that_use_each_model(cache: Path, tmp_path: Path) -> None:
    config = tmp_path / "servers.toml"
    config.write_text(f'[[instances]]\nmodel = "{CHAT.repo_id}"\nname = "tiny"\n\n[[instances]]\nmodel = "acme/not-pulled"\n')
    env = hub_env(cache, "http://127.0.0.1:9", MVTUI_CONFIG=str(config))
    found = listed(env)
    chat = next(model for model in found["models"] if model["repo_id"] == CHAT.repo_id)
    assert chat["instances"] == [{"name": "tiny", "model": CHAT.repo_id, "state": None}]
    assert [item["model"] for item in found["not_cached"]] == ["acme/not-pulled"]
    table = mvtui(env, "models").stdout.splitlines()
    assert table[0].split() == ["MODEL", "KIND", "SIZE", "REVISION", "DATE", "INSTANCES"]
    row = next(line.split() for line in table if line.startswith(CHAT.repo_id))
    assert row[1:2] == [GENERATION] and row[3] == CHAT.commit[:12] and row[-1] == "tiny"
    assert any(line.startswith("not in the cache: acme/not-pulled") for line in table)
    assert table[-1] == f"instances from {config} (no mvtui is running)"


# --- mvtui assign ----------------------------------------------------------------------------------

COMMENTED = f"""# my cluster
[router]
port = 8888  # the usual

[[instances]]
# the chat model
model = "{CHAT.repo_id}"   # pulled last week
name = "tiny"
gpu_memory_utilization = 0.3  # leaves room

# the admin API stays on loopback
[admin]
port = 0
"""


def test_assign_edits_the_entry_in_place_keeping_comments(cache: Path, tmp_path: Path) -> None:
    config = tmp_path / "servers.toml"
    config.write_text(COMMENTED)
    env = hub_env(cache, "http://127.0.0.1:9")
    args = ["--devices", "0,1", "--gpu-memory-utilization", "0.4", "--max-model-len", "8192", "--tensor-parallel-size", "2"]
    done = mvtui(env, "assign", "tiny", *args, "--extra-arg=--dtype=bfloat16", "--preload", "--show", "--config", str(config))
    assert done.returncode == 0, done.stderr
    text = config.read_text()
    assert text.startswith("# my cluster\n[router]\nport = 8888  # the usual\n")
    assert (
        '# the chat model\nmodel = "acme/tiny-chat"   # pulled last week\nname = "tiny"\ngpu_memory_utilization = 0.4  # leaves room\n'
        in text
    )
    assert text.endswith("\n# the admin API stays on loopback\n[admin]\nport = 0\n")
    (entry,) = parse_config(text).instances
    assert (entry.devices, entry.gpu_memory_utilization, entry.max_model_len, entry.tensor_parallel_size) == ((0, 1), 0.4, 8192, 2)
    assert entry.extra_args == ("--dtype=bfloat16",) and entry.preload
    assert done.stdout.startswith(f"changed [[instances]] tiny in {config}\n[[instances]]\n# the chat model\n")
    assert done.stdout.endswith('extra_args = ["--dtype=bfloat16"]\npreload = true\n')


def test_assign_adds_an_entry_for_a_cached_model_and_show_prints_it(cache: Path, tmp_path: Path) -> None:
    config = tmp_path / "servers.toml"
    config.write_text(COMMENTED)
    env = hub_env(cache, "http://127.0.0.1:9", MVTUI_CONFIG=str(config))
    done = mvtui(env, "assign", EMBED.repo_id, "--devices", "1", "--no-preload")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"added [[instances]] {EMBED.repo_id} in {config}\n"
    text = config.read_text()
    assert text.endswith(
        f'\n[[instances]]\nmodel = "{EMBED.repo_id}"\ndevices = [1]\npreload = false\n\n# the admin API stays on loopback\n[admin]\nport = 0\n'
    )
    shown = mvtui(env, "assign", EMBED.repo_id, "--show")
    assert shown.returncode == 0 and shown.stdout == f'[[instances]]\nmodel = "{EMBED.repo_id}"\ndevices = [1]\npreload = false\n'
    as_json = json.loads(mvtui(env, "assign", EMBED.repo_id, "--json").stdout)
    assert as_json["entry"] == {"model": EMBED.repo_id, "devices": [1], "preload": False} and as_json["path"] == str(config)


def test_assign_refuses_an_unknown_model_with_the_near_names(cache: Path, tmp_path: Path) -> None:
    config = tmp_path / "servers.toml"
    config.write_text(COMMENTED)
    env = hub_env(cache, "http://127.0.0.1:9", MVTUI_CONFIG=str(config))
    done = mvtui(env, "assign", "acme/tiny-chta", "--devices", "0")
    assert done.returncode == 1 and "unknown model 'acme/tiny-chta'" in done.stderr
    assert "did you mean acme/tiny-chat" in done.stderr and "--new adds the entry anyway" in done.stderr
    assert config.read_text() == COMMENTED
    forced = mvtui(env, "assign", "acme/tiny-chta", "--devices", "0", "--new")
    assert forced.returncode == 0, forced.stderr
    assert parse_config(config.read_text()).instances[-1] == InstanceConfig(model="acme/tiny-chta", devices=(0,))


def test_assign_refuses_a_value_the_config_would_reject(cache: Path, tmp_path: Path) -> None:
    config = tmp_path / "servers.toml"
    config.write_text(COMMENTED)
    done = mvtui(hub_env(cache, "http://127.0.0.1:9"), "--config", str(config), "assign", "tiny", "--gpu-memory-utilization", "1.5")
    assert done.returncode == 1 and "gpu_memory_utilization" in done.stderr
    assert config.read_text() == COMMENTED


def test_assign_writes_a_new_file_when_there_is_none(cache: Path, tmp_path: Path) -> None:
    config = tmp_path / "new" / "servers.toml"
    config.parent.mkdir()
    done = mvtui(hub_env(cache, "http://127.0.0.1:9", MVTUI_CONFIG=str(config)), "assign", CHAT.repo_id, "--max-model-len", "4096")
    assert done.returncode == 0, done.stderr
    assert config.read_text() == f'[[instances]]\nmodel = "{CHAT.repo_id}"\nmax_model_len = 4096\n'


# --- the entry editor ------------------------------------------------------------------------------

TWO = """[[instances]]
model = "a/b"
name = "first"
# about first

# the second one
[[instances]]
model = "a/b"
name = "second"
"""


def edited(text: str, key: str, values: dict[str, Any], create: bool = False) -> str:
    document = tomlkit.parse(text)
    set_instance(key, values, create=create)(document)
    return document.as_string()


def test_entries_are_found_by_name_then_model() -> None:
    document = tomlkit.parse(TWO)
    assert (find_instance(document, "second") or {}).get("name") == "second"
    assert find_instance(document, "c/d") is None
    with pytest.raises(ConfigEditError, match="2 \\[\\[instances\\]\\] entries serve 'a/b' \\(first, second\\); name one"):
        find_instance(document, "a/b")


def test_a_new_key_goes_after_the_last_key_not_after_the_next_entry_s_comments() -> None:
    text = edited(TWO, "first", {"devices": [0]})
    assert text.startswith('[[instances]]\nmodel = "a/b"\nname = "first"\ndevices = [0]\n# about first\n\n# the second one\n')
    assert edited(TWO, "second", {"preload": True}).endswith('name = "second"\npreload = true\n')


def test_a_new_entry_goes_after_the_last_one_before_what_introduces_the_next_table() -> None:
    text = edited(COMMENTED, "c/d", {"model": "c/d", "max_model_len": 8192}, create=True)
    assert '# leaves room\n\n[[instances]]\nmodel = "c/d"\nmax_model_len = 8192\n\n# the admin API stays on loopback\n[admin]' in text
    fresh = edited("[router]\nport = 1\n", "c/d", {"model": "c/d"}, create=True)
    assert fresh == '[router]\nport = 1\n\n[[instances]]\nmodel = "c/d"\n'
    with pytest.raises(ConfigEditError, match="no \\[\\[instances\\]\\] entry for 'c/d'"):
        edited(TWO, "c/d", {"devices": [0]})


def test_the_entry_text_stops_at_its_last_key() -> None:
    entry = find_instance(tomlkit.parse(TWO), "first")
    assert entry is not None and instance_text(entry) == '[[instances]]\nmodel = "a/b"\nname = "first"\n'


# --- kinds and near names --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "files", "kind"),
    [
        ({"architectures": ["Qwen2ForCausalLM"]}, [], GENERATION),
        ({"architectures": ["LlavaForConditionalGeneration"]}, [], GENERATION),
        ({"architectures": ["GPT2LMHeadModel"]}, [], GENERATION),
        ({"architectures": ["BertModel"]}, [], EMBEDDING),
        ({"architectures": ["Qwen3ForCausalLM"]}, ["config_sentence_transformers.json"], EMBEDDING),
        ({"model_type": "xlm-roberta"}, [], EMBEDDING),
        ({"architectures": ["XLMRobertaForSequenceClassification"]}, [], CLASSIFICATION),
        (None, ["model.gguf"], UNKNOWN),
        ({"architectures": "not a list"}, [], UNKNOWN),
    ],
)
def test_model_kind_from_config_json(config: dict[str, Any] | None, files: list[str], kind: str) -> None:
    assert model_kind(config, files) == kind


def test_near_names() -> None:
    known = ["Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-3.1-8B-Instruct", "demo"]
    assert near_names("qwen2.5-7b-instruct", known)[0] == "Qwen/Qwen2.5-7B-Instruct"
    assert near_names("llama", known) == ["meta-llama/Llama-3.1-8B-Instruct"]
    assert near_names("demmo", known) == ["demo"]
    assert unknown_model("zzz", ["a", "b"], "here") == "unknown model 'zzz' (here); there are: a, b"


# --- the CLI stays light ---------------------------------------------------------------------------

LOADED = """
import json, sys
from mvtui.cli import build_parser, main
listed = build_parser().format_help()
code = main(["ps"])
print(json.dumps({"code": code, "listed": listed, "modules": sorted(sys.modules)}))
"""


def test_other_commands_load_neither_huggingface_hub_nor_openai(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XDG_STATE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", LOADED], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["code"] == 3  # no mvtui runs
    for command in ("models", "pull", "run", "assign", "restart"):
        assert f"\n    {command} " in found["listed"]
    heavy = ("huggingface_hub", "openai", "httpx2", "mvtui.models", "mvtui.admin.model_commands")
    assert [name for name in found["modules"] if name.startswith(heavy)] == []
