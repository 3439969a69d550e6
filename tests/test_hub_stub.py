"""Round-trips a PEFT adapter through the loopback Hub stub with real huggingface_hub / transformers / PEFT code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

try:
    from conftest_hub import hub  # noqa: F401  (fixture)
    from hub_stub import HubStub
except ImportError:  # tests/ imported as a package
    from tests.conftest_hub import hub  # noqa: F401
    from tests.hub_stub import HubStub

import huggingface_hub
import huggingface_hub.constants as hf_constants
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

REPO = "user/tiny-lora"


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


def test_push_to_hub_and_load_back(hub: HubStub, monkeypatch, tmp_path):
    from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B starts at zero: make every LoRA weight non-trivial so the comparison means something
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p))
    model.eval()

    commit = model.push_to_hub(REPO)
    files = hub.files(REPO)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert commit.oid == hub.commits(REPO)[-1]
    assert json.loads(files["adapter_config.json"])["peft_type"] == "LORA"

    # The Hub API view of the repo, through the real client.
    api = huggingface_hub.HfApi()
    assert api.model_info(REPO).sha == commit.oid
    assert set(api.list_repo_files(REPO)) == set(files)
    assert api.file_exists(REPO, "adapter_model.safetensors")
    assert not api.file_exists(REPO, "nope.bin")

    # Load back into a fresh, empty cache: everything must come over HTTP from the stub.
    fresh_cache = tmp_path / "fresh_cache"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(fresh_cache))
    n_resolve_before = sum("/resolve/" in path for _, path in hub.requests)
    assert PeftConfig.from_pretrained(REPO).r == 4
    loaded = PeftModel.from_pretrained(_tiny_llama(), REPO).eval()
    assert sum("/resolve/" in path for _, path in hub.requests) > n_resolve_before
    cached = {p.name for p in fresh_cache.rglob("*") if p.is_file()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= cached

    expected, got = get_peft_model_state_dict(model), get_peft_model_state_dict(loaded)
    assert expected.keys() == got.keys() and len(expected) == 8  # 2 layers x (q, v) x (A, B)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)

    # Unchanged files are skipped by the client (the stub reports their oids in preupload): no empty commit.
    n_commits = len(hub.commits(REPO))
    model.push_to_hub(REPO)
    assert len(hub.commits(REPO)) == n_commits


def test_missing_repo_and_file_raise_hub_errors(hub: HubStub):
    from peft import PeftConfig

    with pytest.raises(RepositoryNotFoundError):
        huggingface_hub.hf_hub_download("user/does-not-exist", "adapter_config.json")
    with pytest.raises(RepositoryNotFoundError):
        huggingface_hub.model_info("user/does-not-exist")
    # PEFT wraps the hub error in a ValueError ("Can't find 'adapter_config.json' at ...") and chains it.
    with pytest.raises(ValueError, match="adapter_config.json") as info:
        PeftConfig.from_pretrained("user/does-not-exist")
    assert isinstance(info.value.__cause__, RepositoryNotFoundError)

    hub.add_files("user/other", {"a.txt": b"hello"})
    with pytest.raises(EntryNotFoundError):
        huggingface_hub.hf_hub_download("user/other", "missing.txt")
    with pytest.raises(RevisionNotFoundError):
        huggingface_hub.hf_hub_download("user/other", "a.txt", revision="no-such-branch")
    path = huggingface_hub.hf_hub_download("user/other", "a.txt")
    assert open(path, "rb").read() == b"hello"


def test_env_vars_alone_point_a_fresh_process_at_the_stub(tmp_path):
    """Outside pytest's monkeypatching: HF_ENDPOINT etc. set *before* import are all a fresh process needs."""
    with HubStub() as stub:
        stub.add_files("user/seeded", {"sub/x.json": b'{"k": 1}'})
        code = textwrap.dedent(
            """
            import huggingface_hub as h
            p = h.hf_hub_download("user/seeded", "sub/x.json")
            assert p.startswith(__import__("os").environ["HF_HUB_CACHE"]), p
            print(open(p).read())
            """
        )
        env = {
            **os.environ,
            "HF_ENDPOINT": stub.endpoint,
            "HF_HOME": str(tmp_path / "home"),
            "HF_HUB_CACHE": str(tmp_path / "home" / "hub"),
            "HF_TOKEN": "hf_dummy",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_PROXY": "127.0.0.1,localhost",
        }
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"k": 1}
        assert ("HEAD", "/user/seeded/resolve/main/sub/x.json") in stub.requests
