"""The documentation: the site builds strictly (no broken link, no missing reference, every generated page), and the
README's Python example runs against today's API (on a tiny saved model, at the paths it names)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mkdocs() -> list[str]:
    exe = Path(sys.executable).with_name("mkdocs")
    if exe.exists():
        return [str(exe)]
    if shutil.which("mkdocs"):
        return [shutil.which("mkdocs")]
    pytest.skip("mkdocs is not installed (the dev extra installs mkdocs-material and mkdocstrings[python]; "
                "`make install` brings them)")


def test_docs_build_strictly(tmp_path):
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings[python] is not installed (dev extra)")
    pytest.importorskip("material", reason="mkdocs-material is not installed (dev extra)")
    cmd = _mkdocs() + ["build", "--strict", "--site-dir", str(tmp_path / "site")]
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    site = tmp_path / "site"
    for page in ("getting-started", "audit", "concepts", "gradient-index", "sae", "models", "benchmarks",
                 "reference/cli", "reference/api/concept_influence.estimators"):
        assert (site / page / "index.html").is_file(), page
    cli = (site / "reference/cli/index.html").read_text()
    for command in ("concept-influence run", "concept-influence index query", "concept-influence concept check",
                    "concept-influence bench emergent"):
        assert command in cli, command  # the CLI reference is generated from the parser, every subcommand


def test_every_public_name_is_documented():
    """Every module of the API reference, and every public class and function defined in it (or in a submodule of a
    documented package), has a docstring: the reference shows nothing but a signature otherwise."""
    griffe = pytest.importorskip("griffe", reason="griffe (with mkdocstrings[python], dev extra) is not installed")
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (dev extra)")
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks" / "generated.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    missing = []

    def walk(obj, submodules: bool):
        if not obj.docstring:
            missing.append(obj.path)
        for name, member in obj.members.items():
            if name.startswith("_") or member.is_alias:
                continue
            if member.is_module:
                if submodules:  # a documented subpackage's modules (the top-level package's have pages of their own)
                    walk(member, True)
            elif (member.is_class or member.is_function) and not member.docstring:
                missing.append(member.path)

    for package in hooks.PACKAGES:
        loaded = griffe.load(package, search_paths=[str(ROOT)], resolve_aliases=False)
        for name in hooks.api_modules():
            if name == package or name.startswith(package + "."):
                walk(loaded, False) if name == package else walk(loaded[name.removeprefix(package + ".")], True)
    assert not missing, f"public names without a docstring: {sorted(set(missing))}"


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no Python example"
    return blocks[0]


def test_readme_is_short_and_names_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert "make test" in text and "make demo" in text and "make docs" in text  # .ci/run runs the README's `make test`


def test_readme_example_runs(tmp_path, monkeypatch):
    """The README's example, run as written in a folder holding the model and chat files it names."""
    import numpy as np
    import torch

    from concept_influence.data import write_chat_jsonl
    from concept_influence.models import save_model
    from concept_influence.toy.demo_corpus import make_demo_corpus
    from concept_influence.toy.small_model import build_small_model, train_bpe_tokenizer

    torch.set_num_threads(1)
    corpus = make_demo_corpus(n_train=24, n_probe=16, n_eval=4, seed=0)
    chats = {"train": corpus.train, "misaligned": corpus.probe_positive, "aligned": corpus.probe_negative,
             "eval_prompts": corpus.eval_prompts}
    (tmp_path / "data").mkdir()
    for name, examples in chats.items():
        write_chat_jsonl(examples, tmp_path / "data" / f"{name}.jsonl")
    texts = [f"User: {c.prompt}\nAssistant: {c.response}" for cs in chats.values() for c in cs]
    tokenizer = train_bpe_tokenizer(texts, tmp_path / "tok", vocab_size=300)
    save_model(build_small_model(tokenizer, n_layers=2, d_model=32, n_heads=4, n_ctx=512, seed=0),
               tmp_path / "models" / "my-finetune")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), namespace)
    scores = namespace["scores"]
    assert scores.values.shape[0] == len(corpus.train) and np.isfinite(scores.values).all()


def test_the_top_level_names_the_entry_points_and_imports_them_on_first_use():
    """``concept_influence`` exports the entry points a first audit needs (the README example imports only from it
    and ``probes``); the heavier ones are imported when first used, so that the command line starts quickly."""
    import subprocess
    import sys

    import concept_influence

    for name in concept_influence.__all__:
        assert getattr(concept_influence, name).__doc__, name
    assert {"ConceptInfluence", "SourceInfluence", "fit_curvature", "GradientIndex", "run_config"} <= set(
        concept_influence.__all__) <= set(dir(concept_influence))
    with pytest.raises(AttributeError, match="has no attribute 'Batch'"):
        concept_influence.Batch  # plumbing stays in its module (concept_influence.data)
    fresh = subprocess.run([sys.executable, "-c", "import sys, concept_influence; "
                            "print('concept_influence.index' in sys.modules, 'concept_influence.runs' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert fresh.stdout.split() == ["False", "False"]
