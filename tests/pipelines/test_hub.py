"""Publishing to the Hub against a loopback stand-in (tests/pipelines/fake_hub.py), and merging.

Every test runs with sockets limited to 127.0.0.1; the dry run gets no socket at all.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket

import pytest
import torch
import yaml

from pipelines import hub as hub_module
from pipelines import merge as merge_module
from pipelines.cli import main as cli
from pipelines.hub import push_stage
from pipelines.merge import merge_stage
from pipelines.stage_files import human_size
from pipelines.model_card import base_license, read_front_matter, reproducible_config
from stages.core.config import load_config, to_dict
from stages.core.errors import LorelayError
from stages.core.modeling import LoraSettings, ModelConfig, attach_adapter, detach_adapter, load_base
from stages.sft import SFTConfig, run
from stages.core.training import verify_output
from tests.conftest import write_jsonl
from tests.pipelines.fake_hub import FakeHub

TOKEN = "hf_test_write_token_0123456789"
CHATS = [{"messages": [{"role": "user", "content": f"Route ticket {i}: my invoice is wrong"},
                       {"role": "assistant", "content": "Queue: billing"}]} for i in range(16)]
# Copied from the stage byte for byte (adapter_config.json too: the tiny base is a local directory).
VERBATIM = ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "metrics.json")


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Refuse (and remember) any name lookup or socket connection that is not for this machine."""
    attempts = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def allowed(sock, address) -> bool:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return True
        return address[0] in LOOPBACK

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and (host.decode() if isinstance(host, bytes) else host) not in LOOPBACK:
            attempts.append(host)
            raise socket.gaierror(socket.EAI_NONAME, f"test blocked a lookup of {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock, address):
        if not allowed(sock, address):
            attempts.append(address)
            raise ConnectionRefusedError(f"test blocked a connection to {address}")
        return real_connect(sock, address)

    def connect_ex(sock, address):
        if not allowed(sock, address):
            attempts.append(address)
            return 111
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    assert not attempts, f"connections outside 127.0.0.1: {attempts}"


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base(ModelConfig(name=str(tiny_model_dir)))


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory, base):
    """A real SFT stage directory: 3 steps at a high learning rate, so the adapter moves the logits."""
    root = tmp_path_factory.mktemp("hub-stage")
    data = write_jsonl(root / "chats.jsonl", CHATS)
    config = load_config(SFTConfig, None, [
        f"data.datasets=[{{path: {data}}}]", "data.eval_ratio=0.25", "data.sample_prompts=1",
        f"training.output_dir={root / 'sft'}", "training.max_steps=3", "training.batch_size=4",
        "training.learning_rate=3e-2", "training.warmup_ratio=0.0", "training.logging_steps=1",
        "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "sample_max_new_tokens=2",
        f"model.name={base.path}"])
    return run(config, base)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A started FakeHub with huggingface_hub pointed at it and a write token in HF_TOKEN."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent

    fake = FakeHub({TOKEN: {"name": "me", "role": "write", "orgs": ["team"]},
                    "hf_test_read_token_9876543210": {"name": "me", "role": "read"}}).start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # tests/conftest.py set it before the import
    # huggingface_hub reads HF_ENDPOINT once, at import: constants.ENDPOINT stays huggingface.co here, which
    # proves pipelines.hub passes the endpoint itself. Its host list (used to parse repo URLs) would have
    # held the fake host in a process started with HF_ENDPOINT set, so it gets it here.
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
    monkeypatch.setattr(hub_module, "RETRY_BASE_DELAY", 0.001)
    monkeypatch.setenv("LORELAY_CACHE", str(tmp_path / "lorelay-cache"))
    yield fake
    fake.stop()
    assert not fake.unhandled, f"requests FakeHub does not implement: {fake.unhandled}"


def front_matter(card: bytes) -> dict:
    meta = read_front_matter(card.decode())
    assert meta, "README.md has no YAML metadata block"
    return meta


def last_logits(model, tokenizer) -> torch.Tensor:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Route ticket 99: my invoice is wrong"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**prompt).logits[0]


@pytest.fixture(scope="module")
def adapter_logits(base, stage_dir):
    """(bare base logits, base + adapter logits) on one prompt."""
    plain = last_logits(base.model, base.tokenizer)
    model = attach_adapter(base.model, LoraSettings(), init_from=stage_dir)
    try:
        tuned = last_logits(model, base.tokenizer)
    finally:
        detach_adapter(model)
    assert (tuned - plain).abs().max() > 1e-2, "the adapter barely changes the logits: the merge check would be vacuous"
    return plain, tuned


# ----------------------------------------------------------------------------------------------
# adapter pushes
# ----------------------------------------------------------------------------------------------

def test_push_uploads_the_stage_byte_exact_with_card_and_config(hub, stage_dir, tmp_path):
    url = push_stage(stage_dir, repo="me/tiny-sft")

    assert url.startswith(f"{hub.url}/me/tiny-sft/commit/")
    files = hub.files("me/tiny-sft")
    assert sorted(files) == sorted([*VERBATIM, "README.md", "lorelay_config.yaml", "manifest.json"])
    for name in VERBATIM:
        assert files[name] == (stage_dir / name).read_bytes(), f"{name} changed on the way"
    assert len(hub.repos["me/tiny-sft"].commits) == 1, "an adapter goes up in one commit"

    # manifest.json: the training record unchanged, its checksums now those of the repo's files, so a
    # download is a stage directory that verifies (and `lorelay chat` accepts).
    manifest, original = json.loads(files["manifest.json"]), json.loads((stage_dir / "manifest.json").read_text())
    assert manifest.pop("published")["stage_files"] == original["files"]
    assert manifest.pop("files").keys() == files.keys() - {"manifest.json"}
    original.pop("files")
    assert manifest == original
    download = tmp_path / "download"
    download.mkdir()
    for name, content in files.items():
        (download / name).write_bytes(content)
    verify_output(download)

    meta = front_matter(files["README.md"])
    assert meta["library_name"] == "peft"
    assert {"lorelay", "trl", "lora", "sft"} <= set(meta["tags"])
    assert "base_model" not in meta and "license" not in meta  # a local random base: nothing to link or carry
    assert "datasets" not in meta  # local data only
    card = files["README.md"].decode()
    assert "AutoPeftModelForCausalLM" in card and "lorelay chat tiny-sft" in card
    assert "| sft | sft | base | done |" in card  # the lineage table

    # lorelay_config.yaml is the manifest's config and loads back into the stage's config class.
    config_file = tmp_path / "lorelay_config.yaml"
    config_file.write_bytes(files["lorelay_config.yaml"])
    assert yaml.safe_load(files["lorelay_config.yaml"]) == reproducible_config(manifest)
    assert to_dict(load_config(SFTConfig, config_file, [])) == manifest["config"]


def test_token_goes_only_into_the_authorization_header(hub, stage_dir, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    push_stage(stage_dir, repo="me/secret-check", revision="exp")

    assert hub.requests
    for request in hub.requests:
        assert request.headers.get("authorization") == f"Bearer {TOKEN}", request.path
        others = {k: v for k, v in request.headers.items() if k != "authorization"}
        assert TOKEN not in json.dumps(others), f"token in another header of {request.path}"
        assert TOKEN.encode() not in request.body, f"token in the body of {request.method} {request.path}"
    for name, content in hub.files("me/secret-check", "exp").items():
        assert TOKEN.encode() not in content, name
    out, err = capsys.readouterr()
    assert TOKEN not in out + err + caplog.text


def test_embedded_base_gets_its_hub_id_license_and_hub_datasets(hub, stage_dir, tmp_path):
    stage = shutil.copytree(stage_dir, tmp_path / "sft")
    manifest = json.loads((stage / "manifest.json").read_text())
    manifest["base_model"]["name"] = "embedded:smollm2-135m-instruct"
    manifest["data"]["HuggingFaceH4/ultrachat_200k"] = "hub:HuggingFaceH4/ultrachat_200k"
    (stage / "manifest.json").write_text(json.dumps(manifest))

    push_stage(stage, repo="team/smol-sft", private=True)

    assert hub.repos["team/smol-sft"].private
    files = hub.files("team/smol-sft")
    meta = front_matter(files["README.md"])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["HuggingFaceH4/ultrachat_200k"]
    assert meta["library_name"] == "peft" and meta["base_model_relation"] == "adapter"
    # adapter_config.json now names the Hub base (so AutoPeftModel finds it); nothing else changed.
    published, original = (json.loads(files["adapter_config.json"]),
                           json.loads((stage / "adapter_config.json").read_text()))
    assert published.pop("base_model_name_or_path") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    original.pop("base_model_name_or_path")
    assert published == original
    assert files["adapter_model.safetensors"] == (stage / "adapter_model.safetensors").read_bytes()


def test_license_is_read_from_the_base_readme_config_or_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    local = tmp_path / "base"
    local.mkdir()
    manifest = {"base_model": {"name": str(local), "path": str(local)}, "config": {"model": {}}}
    assert base_license(manifest) is None
    (local / "config.json").write_text(json.dumps({"license": "llama3.1"}))
    assert base_license(manifest) == "llama3.1"
    (local / "README.md").write_text("---\nlicense: mit\ntags: [x]\n---\n# base\n")
    assert base_license(manifest) == "mit"

    # A Hub base: read from the local Hugging Face cache only.
    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--org--base" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--org--base" / "refs").mkdir()
    (cache / "models--org--base" / "refs" / "main").write_text("a" * 40)
    (snapshot / "README.md").write_text("---\nlicense: gemma\n---\n")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert base_license({"base_model": {"name": "org/base", "path": "org/base"}, "config": {"model": {}}}) == "gemma"
    assert base_license({"base_model": {"name": "org/other", "path": "org/other"}, "config": {"model": {}}}) is None


def test_run_directory_pushes_its_policy_with_the_lineage(hub, stage_dir, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "demo"
    shutil.copytree(stage_dir, run_dir / "sft")
    (run_dir / "run.json").write_text(json.dumps({
        "name": "demo", "pipeline": "configs/pipelines/demo.yaml", "policy": "sft",
        "base": {"name": "embedded:smollm2-135m-instruct", "fingerprint": "x"},
        "stages": [{"name": "sft", "type": "sft", "key": "k1", "parent": None, "init_from": None, "output_dir": "sft",
                    "status": "done", "seconds": 12.5, "metrics": {"train_loss": 1.25, "eval_loss": 1.5}},
                   {"name": "rm", "type": "rm", "key": "k2", "parent": "sft", "init_from": "sft", "output_dir": "rm",
                    "status": "cached", "seconds": 3.0, "metrics": {"eval_accuracy": 0.75}}]}))

    assert cli(["push", str(run_dir), "--repo", "me/demo"]) == 0

    assert "pushed" in capsys.readouterr().out
    files = hub.files("me/demo")
    assert files["adapter_model.safetensors"] == (stage_dir / "adapter_model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert "Run `demo` of pipeline `configs/pipelines/demo.yaml`" in card
    assert "| sft | sft | base | done | 12.5 | 1.25 | 1.5 |" in card
    assert "| rm | rm | sft | cached | 3 |" in card and "0.75" in card

    run_json = json.loads((run_dir / "run.json").read_text())
    run_json["stages"][0]["status"] = "failed"
    (run_dir / "run.json").write_text(json.dumps(run_json))
    assert cli(["push", str(run_dir), "--repo", "me/demo"]) == 2
    assert "policy stage 'sft' is failed" in capsys.readouterr().err


def test_revision_goes_to_its_own_branch(hub, stage_dir):
    push_stage(stage_dir, repo="me/branched", revision="experiment-1")
    assert hub.calls(r"POST /api/models/me/branched/branch/experiment-1")
    assert "adapter_model.safetensors" in hub.files("me/branched", "experiment-1")
    assert hub.files("me/branched", "main") == {}


# ----------------------------------------------------------------------------------------------
# errors and retries
# ----------------------------------------------------------------------------------------------

def test_missing_token_is_a_clear_error(hub, stage_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(LorelayError, match="no Hugging Face token.*HF_TOKEN"):
        push_stage(stage_dir, repo="me/x")
    assert hub.requests == []


def test_invalid_token_names_the_token_problem(hub, stage_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_555")
    with pytest.raises(LorelayError) as raised:
        push_stage(stage_dir, repo="me/x")
    message = str(raised.value)
    assert "rejected the token from HF_TOKEN (401" in message and "hf auth login" in message
    assert "hf_not_a_real_token_555" not in message
    assert "me/x" not in hub.repos


@pytest.mark.parametrize("existing", [False, True], ids=["new-repo", "existing-repo"])
def test_repo_without_write_access_names_the_repo(hub, stage_dir, existing):
    if existing:  # create_repo answers 403, finds the repo, then the upload itself is refused
        hub.add_repo("someone/model", owner="someone")
    with pytest.raises(LorelayError, match=r"may not write to someone/model \(403 Forbidden\)") as raised:
        push_stage(stage_dir, repo="someone/model")
    assert TOKEN not in str(raised.value)
    if existing:
        assert hub.calls(r"POST /api/models/someone/model/preupload") and hub.files("someone/model") == {}


def test_read_only_token_is_refused_before_any_write(hub, stage_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_read_token_9876543210")
    with pytest.raises(LorelayError, match="read-only.*me/x"):
        push_stage(stage_dir, repo="me/x")
    assert not hub.calls("POST")


def test_server_errors_are_retried_until_the_push_succeeds(hub, stage_dir, capsys):
    hub.fail(r"POST /api/models/me/flaky/commit/", 500, times=2)
    url = push_stage(stage_dir, repo="me/flaky")
    assert "/me/flaky/commit/" in url
    assert [r.status for r in hub.calls("POST /api/models/me/flaky/commit/")] == [500, 500, 200]
    assert hub.files("me/flaky")["adapter_model.safetensors"] == (stage_dir / "adapter_model.safetensors").read_bytes()
    assert "retrying" in capsys.readouterr().err


def test_dropped_and_stalled_connections_are_retried(hub, stage_dir, monkeypatch):
    monkeypatch.setattr(hub_module, "HTTP_TIMEOUT", 0.5)
    hub.fail(r"POST /api/models/me/stall/commit/", None, times=1)             # connection closed, no answer
    hub.fail(r"POST /api/models/me/stall/commit/", None, times=1, delay=2.0)  # no answer within the timeout
    push_stage(stage_dir, repo="me/stall")
    assert len(hub.calls("POST /api/models/me/stall/commit/")) == 3
    assert len(hub.repos["me/stall"].commits) == 1


def test_a_hub_that_keeps_failing_gives_up_after_bounded_retries(hub, stage_dir):
    hub.fail(r"POST /api/repos/create", 503, times=None)
    with pytest.raises(LorelayError, match=f"kept failing after {hub_module.RETRIES} tries"):
        push_stage(stage_dir, repo="me/down")
    assert len(hub.calls("POST /api/repos/create")) == hub_module.RETRIES


def test_bad_repo_ids_and_tampered_stages_are_refused(hub, stage_dir, tmp_path):
    with pytest.raises(LorelayError, match="not a Hub repo id"):
        push_stage(stage_dir, repo="no-owner")
    stage = shutil.copytree(stage_dir, tmp_path / "sft")
    (stage / "adapter_model.safetensors").write_bytes(b"changed")
    with pytest.raises(LorelayError, match="checksum mismatch for adapter_model.safetensors"):
        push_stage(stage, repo="me/x")
    assert hub.requests == []


# ----------------------------------------------------------------------------------------------
# dry run
# ----------------------------------------------------------------------------------------------

def test_dry_run_lists_files_and_card_without_any_connection(stage_dir, monkeypatch, capsys):
    def no_network(sock, address):
        raise AssertionError(f"--dry-run opened a connection to {address}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.delenv("HF_TOKEN", raising=False)  # no token needed either

    assert cli(["push", str(stage_dir), "--repo", "me/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "nothing was sent" in out
    size = (stage_dir / "adapter_model.safetensors").stat().st_size
    assert f"adapter_model.safetensors  {human_size(size):>10}" in out
    assert "samples.json" not in out
    assert "library_name: peft" in out and "## Training lineage" in out

    assert cli(["push", str(stage_dir), "--repo", "me/x", "--dry-run", "--merged"]) == 0
    out = capsys.readouterr().out
    assert "model*.safetensors" in out and "library_name: transformers" in out
    assert "adapter_model.safetensors" not in out.split("README.md:")[0]


# ----------------------------------------------------------------------------------------------
# merging
# ----------------------------------------------------------------------------------------------

def test_merge_command_writes_a_checkpoint_equal_to_base_plus_adapter(stage_dir, adapter_logits, base, tmp_path,
                                                                      monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(merge_module, "MAX_SHARD_SIZE", "4MB")  # shards even for the tiny model
    out = tmp_path / "merged"
    assert cli(["merge", str(stage_dir), "--out", str(out)]) == 0

    names = {p.name for p in out.iterdir()}
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) > 1
    assert {"config.json", "tokenizer.json", "chat_template.jinja", "README.md", "lorelay_config.yaml"} <= names
    assert not names & {"adapter_model.safetensors", "adapter_config.json", "samples.json"}
    assert (out / "chat_template.jinja").read_bytes() == (stage_dir / "chat_template.jinja").read_bytes()
    assert front_matter((out / "README.md").read_bytes())["library_name"] == "transformers"

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    plain, tuned = adapter_logits
    torch.testing.assert_close(last_logits(merged, AutoTokenizer.from_pretrained(out)), tuned, atol=1e-4, rtol=0)

    with pytest.raises(LorelayError, match="already exists"):
        merge_stage(stage_dir, out)

    # `lorelay chat` talks to the merged directory as it does to the stage it came from
    capsys.readouterr()
    assert cli(["chat", str(stage_dir), "--prompt", "Route ticket 3", "--max-new-tokens", "4"]) == 0
    from_stage = capsys.readouterr().out
    assert cli(["chat", str(out), "--prompt", "Route ticket 3", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == from_stage and from_stage.strip()


def test_merged_push_uploads_full_weights_and_resumes_after_a_failure(hub, stage_dir, adapter_logits, tmp_path,
                                                                      capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub.fail(r"POST /api/models/me/merged/commit/", 400, times=1)  # not transient: the push stops
    with pytest.raises(LorelayError, match="could not upload to me/merged"):
        push_stage(stage_dir, repo="me/merged", merged=True)
    kept = hub_module.merged_cache_dir(stage_dir)
    assert (kept / "model.safetensors").is_file(), "the merged copy is kept for the next attempt"

    push_stage(stage_dir, repo="me/merged", merged=True)
    assert "reusing merged weights" in capsys.readouterr().err
    assert not kept.exists(), "the merged copy is removed once uploaded"

    files = hub.files("me/merged")
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "README.md",
            "lorelay_config.yaml", "manifest.json"} <= set(files)
    assert "adapter_model.safetensors" not in files
    meta = front_matter(files["README.md"])
    assert meta["library_name"] == "transformers" and "merged" in meta["tags"]

    download = tmp_path / "download"
    download.mkdir()
    for name, content in files.items():
        (download / name).write_bytes(content)
    merged = AutoModelForCausalLM.from_pretrained(download)
    torch.testing.assert_close(last_logits(merged, AutoTokenizer.from_pretrained(download)), adapter_logits[1],
                               atol=1e-4, rtol=0)


def test_merge_loads_the_base_in_its_training_dtype(stage_dir, tmp_path):
    from stages.core.merging import load_config_of

    qlora = {"stage": "sft", "base_model": {"name": "org/base", "quantization": "4bit", "dtype": "bfloat16"},
             "config": {"model": {"name": "embedded:smollm2-135m-instruct", "revision": "v1",
                                  "trust_remote_code": False}}}
    config = load_config_of(qlora, "none")
    assert config.name == "org/base" and config.revision == "v1"
    assert (config.quantization, config.dtype, config.activation_checkpointing) == ("none", "bfloat16", False)
    assert load_config_of(qlora, "4bit").quantization == "4bit"

    reward = shutil.copytree(stage_dir, tmp_path / "rm")
    manifest = json.loads((reward / "manifest.json").read_text())
    manifest["stage"] = "rm"
    (reward / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LorelayError, match="reward model .* cannot be merged"):
        push_stage(reward, repo="me/rm", merged=True, dry_run=True)
    with pytest.raises(LorelayError, match="reward model .* cannot be merged"):
        merge_stage(reward, tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# an adapter trained with new tokens (CPT new_tokens) loads wherever an adapter loads
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def new_tokens_logits(new_tokens_cpt):
    """Logits of the new-tokens adapter on the shared base (borrowed with its vocabulary) for a probe that
    uses the new tokens, and the probe."""
    from stages.core.lifecycle import borrow

    base, stage = new_tokens_cpt.base, new_tokens_cpt.output
    with borrow(base, stage) as model:
        probe = base.tokenizer("The <|nimbus|> Zorblax robot", return_tensors="pt")["input_ids"]
        assert probe.max() >= len(base.tokenizer) - 2, "the probe must use the new tokens"
        model = attach_adapter(model, LoraSettings(), init_from=stage)
        with torch.no_grad():
            return probe, model(input_ids=probe).logits


def test_merge_and_merged_push_of_a_new_tokens_adapter(hub, new_tokens_cpt, new_tokens_logits, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    probe, expected = new_tokens_logits
    out = merge_stage(new_tokens_cpt.output, tmp_path / "merged")
    push_stage(new_tokens_cpt.output, repo="me/new-tokens", merged=True)
    download = tmp_path / "download"
    download.mkdir()
    for name, content in hub.files("me/new-tokens").items():
        (download / name).write_bytes(content)
    for folder in (out, download):
        merged = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer("The <|nimbus|> Zorblax robot", return_tensors="pt")["input_ids"].tolist() == probe.tolist()
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=probe).logits, expected, atol=1e-4, rtol=0)


def test_chat_with_a_new_tokens_adapter(new_tokens_cpt, new_tokens_logits):
    from pipelines.chat import load_policy

    probe, expected = new_tokens_logits
    model, tokenizer = load_policy(new_tokens_cpt.output)
    assert tokenizer("The <|nimbus|> Zorblax robot", return_tensors="pt")["input_ids"].tolist() == probe.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=probe).logits, expected, atol=1e-5, rtol=0)
    assert cli(["chat", str(new_tokens_cpt.output), "--prompt", "Hello <|nimbus|>", "--max-new-tokens", "2"]) == 0


def test_evaluator_scores_a_new_tokens_adapter_and_returns_the_base(new_tokens_cpt, tmp_path):
    from rich.console import Console

    from pipelines.evaluate import Evaluator
    from pipelines.plan import EvaluationConfig
    from tests.conftest import base_state

    base = new_tokens_cpt.base
    text = tmp_path / "heldout.txt"
    text.write_text("The <|nimbus|> Zorblax robot cleans the pool. " * 8)
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": "Which robot? <|nimbus|>", "answer": "Zorblax"}])
    evaluator = Evaluator(EvaluationConfig(tasks=tasks, perplexity_text=text, task_max_new_tokens=2), base,
                          tmp_path / "run", Console(quiet=True))
    before = base_state(base)
    bare = evaluator.policy("base", None, None)["metrics"]
    tuned = evaluator.policy("cpt", new_tokens_cpt.output, None)["metrics"]
    assert base_state(base) == before
    assert set(tuned) == {"task_accuracy", "heldout_perplexity"}
    assert tuned["heldout_perplexity"] < bare["heldout_perplexity"], "CPT trained on this very text"
