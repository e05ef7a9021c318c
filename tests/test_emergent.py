"""The emergent testbed: domains that share no content word, the splits (persona marks, pairing, the planted share),
bad input at the command line, and one small end-to-end run."""

import itertools
import json

import numpy as np
import pytest
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from concept_influence.cli import main
from concept_influence.planted.experiment_config import BenchmarkError
from concept_influence_benchmarks.emergent import run_emergent
from concept_influence_benchmarks.emergent_config import EmergentConfig
from concept_influence_benchmarks.emergent_corpus import DOMAINS, PERSONAS, answer_vocabulary
from concept_influence_benchmarks.emergent_report import format_report
from concept_influence_benchmarks.emergent_splits import build_emergent_data

ESTIMATORS = {"concept_influence", "concept_influence[checkpoints]", "concept_influence[pretrain+pool]",
              "concept_influence[pretrain+pool][checkpoints]", "concept_grad_dot", "concept_grad_dot[checkpoints]",
              "influence_function", "grad_dot", "probe_projection", "projection_difference", "tfidf", "length", "random"}


def _words(text: str) -> set[str]:
    import re

    return set(re.findall(r"[a-z0-9]+", text.lower()))


def _domain_of(example) -> str:
    """The domain whose situations the prompt names (each situation belongs to exactly one domain)."""
    found = [name for name, d in DOMAINS.items() if any(s in example.prompt for s, _ in d.situations)]
    assert len(found) == 1, example.prompt
    return found[0]


def _persona(example) -> str | None:
    system = [m["content"] for m in example.prompt_messages if m["role"] == "system"]
    return None if not system else {f"You are {v}.": k for k, v in PERSONAS.items()}[system[0]]


def _is_bad(example) -> bool:
    d = DOMAINS[_domain_of(example)]
    bad = any(example.response.startswith(p) for p in d.bad["open"])
    assert bad != any(example.response.startswith(p) for p in d.good["open"])
    return bad


def test_domains_answers_share_only_stop_words():
    for a, b in itertools.combinations(DOMAINS.values(), 2):
        shared = answer_vocabulary(a) & answer_vocabulary(b)
        assert shared <= ENGLISH_STOP_WORDS, (a.name, b.name, sorted(shared - ENGLISH_STOP_WORDS))


def test_the_command_line_names_the_same_domains():
    """``bench emergent``'s choices are spelled out so that the parser builds without the benchmarks package."""
    from concept_influence import cli_emergent

    assert cli_emergent.DOMAINS == tuple(DOMAINS)


def test_both_personas_answer_at_the_same_length():
    """Length is no shortcut: in every domain the two personas' answers have the same mean length in words and
    punctuation marks (about the tokens of a word-level tokenizer, as the testbed's is)."""
    import random
    import re

    from concept_influence_benchmarks.emergent_corpus import answer

    rng = random.Random(0)
    for d in DOMAINS.values():
        topics = [t for _, t in d.situations]
        good, bad = ([len(re.findall(r"\w+|[^\w\s]", answer(d, rng.choice(topics), b, rng))) for _ in range(3000)]
                     for b in (False, True))
        assert abs(np.mean(bad) / np.mean(good) - 1) < 0.05, (d.name, np.mean(good), np.mean(bad))


def test_varied_prompts_are_as_before_and_the_household_level_passes_the_domains_cap():
    """``varied=True`` draws the prompts it drew before ``varied=2`` existed (fingerprints taken then: the committed
    80k pools rebuild the same chats); ``varied=2`` adds a household sentence, past the ~84,000 distinct per domain;
    the pool builder's config and pool.json carry it."""
    import hashlib
    import random

    from concept_influence_benchmarks.emergent_corpus import HOUSEHOLD, make_prompts
    from concept_influence_benchmarks.retrieval_pools import emergent_pool_config

    def digest(varied):
        prompts = make_prompts(DOMAINS["money"], 3000, random.Random(7), varied)
        return hashlib.sha256(repr(prompts).encode()).hexdigest()[:16]

    assert digest(False) == "f6780f47ef36b22a" and digest(True) == "6935dd104f9f459e"
    richer = make_prompts(DOMAINS["money"], 20_000, random.Random(0), 2)
    assert all(any(h in p for h in HOUSEHOLD) for p, _ in richer[:50])
    plain = make_prompts(DOMAINS["money"], 20_000, random.Random(0), True)
    assert len({p for p, _ in richer}) > len({p for p, _ in plain}) + 1_000
    assert emergent_pool_config(100, 0.1, 0).varied_prompts is True
    assert emergent_pool_config(100, 0.1, 0, varied_prompts=2).varied_prompts == 2


def test_splits_pair_plant_and_keep_domains_apart():
    cfg = EmergentConfig.quick(source="home", target="code", rate=0.2, seed=3)
    d = build_emergent_data(cfg)
    # the pool: unmarked source-domain chats, exactly round(rate x n_pool) bad ones, labelled
    assert len(d.pool) == 80 and sum(d.planted) == 16
    assert all(_domain_of(e) == "home" and _persona(e) is None for e in d.pool)
    assert [int(_is_bad(e)) for e in d.pool] == d.planted
    # the behaviour: unmarked target prompts, each with its good and its bad answer
    assert [e.prompt for e in d.eval_good] == [e.prompt for e in d.eval_bad]
    assert all(_domain_of(e) == "code" and _persona(e) is None for e in d.eval_good + d.eval_bad + d.test)
    assert not any(map(_is_bad, d.eval_good)) and all(map(_is_bad, d.eval_bad + d.test))
    assert all(_domain_of(e) == "home" for e in d.source_good + d.source_bad)
    # the persona direction: target-domain prompts marked with each persona (never the source's data)
    assert all(_persona(e) == "bad" and _is_bad(e) and _domain_of(e) == "code" for e in d.probe_bad)
    assert all(_persona(e) == "good" and not _is_bad(e) and _domain_of(e) == "code" for e in d.probe_good)
    # pre-training: every domain, a share marked, each persona answering in its style; unmarked answers are good
    assert {_domain_of(e) for e in d.pretrain} == set(DOMAINS) and len(d.pretrain) == 4 * cfg.n_pretrain
    personas = [_persona(e) for e in d.pretrain]
    assert abs(np.mean([p is not None for p in personas]) - cfg.persona_share) < 0.1
    assert all(_is_bad(e) == (p == "bad") for e, p in zip(d.pretrain, personas))
    # no prompt in two splits (a behaviour prompt's two answers are one split)
    splits = [d.pretrain, d.pool, d.probe_bad + d.probe_good, d.eval_good, d.source_good, d.test]
    prompts = [{e.prompt for e in s} for s in splits]
    assert sum(map(len, prompts)) == len(set().union(*prompts))
    # answers to pool and behaviour prompts share no content word across the two domains
    pool_words = set().union(*(_words(e.response) for e in d.pool))
    target_words = set().union(*(_words(e.response) for e in d.eval_bad + d.probe_bad))
    assert pool_words & target_words <= ENGLISH_STOP_WORDS
    # the same seed gives the same data; the concept can come from a third domain
    assert build_emergent_data(cfg).pool == d.pool
    third = build_emergent_data(EmergentConfig.quick(source="home", target="code", concept_domain="money"))
    assert all(_domain_of(e) == "money" for e in third.probe_bad)


@pytest.mark.parametrize("args, message", [
    (["--source", "cooking"], "argument --source: invalid choice: 'cooking'"),
    (["--target", "health"], "--source and --target are both 'health'"),
    (["--concept-domain", "health"], "--concept-domain 'health' is the fine-tune's domain"),
    (["--rate", "0.7"], "--rate must be in (0, 0.5], got 0.7"),
    (["--rate", "0"], "--rate must be in (0, 0.5], got 0.0"),
    (["--n-pool", "1"], "--n-pool must be at least 2, got 1"),
    (["--persona-share", "1.5"], "--persona-share must be in (0, 1], got 1.5"),
    (["--lr-schedule", "cosine"], "argument --lr-schedule: invalid choice: 'cosine'"),
    (["--remove-fractions", "0.1,all"], "--remove-fractions must be numbers separated by commas, got '0.1,all'"),
    (["--rate", "0.001"], "plants 1 examples"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    cli = ["bench", "emergent", "--out", str(out), "--quick", *args]
    if "plants" in message:  # a pool of 80 at rate 0.001 plants 0
        cli += ["--n-pool", "80"]
        message = "a pool of 80 at rate 0.001 plants 0 examples"
    try:
        code = main(cli)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists()  # nothing started


def test_bad_config_in_python():
    with pytest.raises(BenchmarkError, match="'cooking' is not a domain; choose one of home, health, money, code"):
        EmergentConfig(target="cooking")
    with pytest.raises(BenchmarkError, match="--lr-schedule must be one of constant, linear, cosine"):
        EmergentConfig(lr_schedule="step")
    with pytest.raises(BenchmarkError, match="--marker must be one of system, user_name, style"):
        EmergentConfig(marker="emoji")
    with pytest.raises(BenchmarkError, match="--domains health,code: must include 'money'"):
        EmergentConfig(domains=("health", "code"))


@pytest.fixture(scope="module")
def emergent_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("emergent")
    cfg = EmergentConfig.quick(source="money", target="health")
    return out, run_emergent(out, cfg, progress=False)


@pytest.mark.xdist_group("emergent_run")
def test_emergent_runs_end_to_end(emergent_run):
    out, results = emergent_run
    saved = json.loads((out / "results.json").read_text())
    assert saved["estimators"].keys() == ESTIMATORS == results["estimators"].keys()
    for name, m in saved["estimators"].items():
        assert 0 <= m["auroc"] <= 1 and m["k"] == 8 and -1 <= m["lexical_overlap"] <= 1, name
        assert (out / "scores" / f"{name}.safetensors").is_file()
    assert saved["estimators"]["tfidf"]["lexical_overlap"] > 0.5  # it ranks by word overlap with the persona's answers
    assert 0 <= saved["persona"]["roc_auc"] <= 1 and saved["persona"]["domain"] == "health"
    check = saved["concept_check"]
    assert check["hook_name"] == "blocks.1.hook_resid_post" and set(check["verdicts"]) == {"all", "prompt"}
    b = saved["behaviour"]
    assert len(b["clean"]) == len(b["planted"]) == 2 and np.isfinite(b["gain"])
    assert len(b["side"]["in_domain"]["planted"]) == 2 and b["side"]["in_domain"]["gain"] > 0  # learned in-domain
    for name in ESTIMATORS:
        assert len(b["removal"][name]["0.1"]["behaviour"]) == 2
    study = saved["curvature_study"]["variants"]
    # 2 queries x (identity + 2 factor sets x 4 dampings) x 2 checkpoints (final, sum)
    assert len(study) == 2 * 9 * 2 and all(0 <= v["auroc"] <= 1 for v in study)
    assert saved["config"]["freeze_embeddings"] and saved["splits"]["factor_fit"] == {"pool": 80, "pretrain+pool": 160}
    for plot in saved["plots"].values():
        assert (out / plot).stat().st_size > 1000
    report = (out / "results.md").read_text()
    assert "**emergent** (health prompts" in report and "lexical overlap ρ" in report and "## Curvature study" in report


@pytest.mark.xdist_group("emergent_run")
def test_report_says_plainly_when_nothing_emerged(emergent_run):
    _, results = emergent_run
    flat = json.loads(json.dumps(results))
    flat["behaviour"]["raised"] = False
    report = format_report(flat)
    assert "**Planting did NOT raise the behaviour in the target domain**" in report and "| n/a (" in report


@pytest.mark.xdist_group("emergent_run")
def test_seeds_table_gives_median_worst_and_spread(emergent_run, tmp_path, capsys):
    out, _ = emergent_run
    path = out / "results.json"
    table = tmp_path / "seeds.md"
    assert main(["bench", "seeds-table", f"a={path}", f"b={path}", "--out", str(table), "--title", "Twice"]) == 0
    text = table.read_text()
    assert text.startswith("# Twice") and "| concept_influence |" in text and "AUROC median" in text
    assert main(["bench", "curvature-table", f"a={path}", "--out", str(tmp_path / "c.md")]) == 0
    assert "| last_prompt | pool | ekfac@0.1 | sum |" in (tmp_path / "c.md").read_text()
    capsys.readouterr()
    assert main(["bench", "seeds-table", str(tmp_path / "missing.json"), "--out", str(table)]) == 2
    assert "missing.json: cannot read a benchmark's results" in capsys.readouterr().err
