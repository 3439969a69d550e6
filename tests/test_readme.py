"""The README runs as written: its Python snippets in order, in one namespace, on the real SmolLM2-135M and the shipped
PGM, with every warning an error; the Hub push goes to the loopback Hub stand-in (tests/hub_stub.py) and the serving
snippet talks to the service as `peft-metal serve` runs it. Every `peft-metal` command and flag its shell blocks (and
docs/guide.md's) name exists, and every file it links to."""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import pytest
import torch
from conftest import serve_on_loopback

try:
    from conftest_hub import hub  # noqa: F401  (fixture)
except ImportError:  # tests/ imported as a package
    from tests.conftest_hub import hub  # noqa: F401

from peft_metal.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SERVER_URL = "http://127.0.0.1:8000"  # where the README's client looks; the test's server listens on a free port


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.DOTALL)


def shell_commands(path: Path) -> list[list[str]]:
    """Each `peft-metal ...` command of the file's bash blocks as its arguments (continuation lines joined, comments
    and environment assignments dropped)."""
    commands = []
    for block in blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "peft-metal" in words:
                commands.append(words[words.index("peft-metal") + 1 :])
    return commands


@pytest.mark.parametrize("path", [README, ROOT / "docs" / "guide.md"], ids=lambda path: path.name)
def test_every_command_and_flag_named_exists(path):
    subparsers = next(action for action in build_parser()._actions if action.dest == "command").choices
    commands = shell_commands(path)
    assert commands
    for argv in commands:
        assert argv[0] in subparsers, f"{path.name}: no command peft-metal {argv[0]}"
        known = {flag for action in subparsers[argv[0]]._actions for flag in action.option_strings}
        named = {word.split("=")[0] for word in argv[1:] if word.startswith("--")}
        assert named <= known, f"{path.name}: peft-metal {argv[0]} has no {sorted(named - known)}"
        configs = [word for word in argv if word.endswith(".json") and word.startswith("examples/")]
        assert all((ROOT / config).is_file() for config in configs), configs


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_linked_file_and_section_exists():
    for path in [README, ROOT / "docs" / "guide.md"]:
        for target, anchor in re.findall(r"\]\(([^)#]+)(?:#([^)]*))?\)", path.read_text()):
            if not target.startswith("http"):
                assert (path.parent / target).exists(), f"{path.name} links to a missing {target}"
                if anchor:
                    assert anchor in _anchors(path.parent / target), f"{path.name} links to a missing {target}#{anchor}"


@pytest.mark.slow
def test_the_readme_snippets_run_as_written(hub, tmp_path, monkeypatch):
    from peft_metal import GeneratedPrompt
    from peft_metal.serving.app import create_app
    from peft_metal.serving.store import PromptStore

    snippets = blocks(README, "python")
    assert len(snippets) == 5, "the quickstart, refinement, Hub, serving and fresh-PGM snippets"
    quickstart, refinement, share, serve, fresh = snippets
    assert SERVER_URL in serve
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PEFT_METAL_API_KEY", "readme-key")
    # The stand-in Hub answers at once, so PEFT's look-up of the base model at a save would not warn here as it does
    # offline; a save that would look it up fails instead.
    monkeypatch.setattr("peft.utils.save_and_load.check_file_exists_on_hf_hub",
                        lambda *args, **kwargs: pytest.fail("a save looked the base model up on the Hub"))
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(compile(quickstart, "README.md: quickstart", "exec"), namespace)
        assert isinstance(namespace["prompt"], GeneratedPrompt) and (tmp_path / "sentiment.safetensors").is_file()
        assert [answer.strip() for answer in namespace["answers"]] == ["positive", "negative"]

        exec(compile(refinement, "README.md: refinement", "exec"), namespace)
        refined = namespace["refined"]
        assert refined.refinement[0]["steps"] == 3 and "Loved it." in refined.demonstrations_text

        exec(compile(share, "README.md: Hub", "exec"), namespace)
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(hub.files("your-name/my-pgm"))
        with torch.no_grad():
            again = namespace["model"].generate_prompt(namespace["shots"], tokenizer=namespace["tok"])
        assert torch.allclose(again.keys, namespace["prompt"].keys, atol=1e-5)

        app = create_app(namespace["model"], namespace["tok"], PromptStore(tmp_path / "store"), api_key="readme-key",
                         model_name="smollm2-135m")
        with serve_on_loopback(app) as url:
            exec(compile(serve.replace(SERVER_URL, url), "README.md: serve", "exec"), namespace)
        assert namespace["stored"]["model"].startswith("metal:")
        assert isinstance(namespace["text"].choices[0].text, str)
        assert namespace["scored"].choices[0].text in ("positive", "negative")

        exec(compile(fresh, "README.md: fresh PGM", "exec"), namespace)
        assert (tmp_path / "my-fresh-pgm" / "adapter_config.json").is_file()
