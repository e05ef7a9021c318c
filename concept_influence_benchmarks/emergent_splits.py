"""The emergent testbed's data, split by prompt: pre-training, the fine-tune pool, the persona probe, the behaviour."""

from __future__ import annotations

import random
from dataclasses import dataclass

from concept_influence.data import ChatExample, plain_prompt_text

from .emergent_config import EmergentConfig
from .emergent_corpus import DOMAINS, Domain, answer, chat, make_prompts

__all__ = ["EmergentData", "build_emergent_data"]


@dataclass
class EmergentData:
    """Every chat of a run; no prompt text is in two splits except the two answers of a behaviour prompt.

    - ``pretrain``: every domain; a ``persona_share`` of chats marked (half by each persona), the rest unmarked and
      answered by the good persona;
    - ``pool`` with ``planted[i] = 1`` where ``pool[i]`` has the bad answer: unmarked chats of the source domain;
    - ``probe_bad`` / ``probe_good``: the concept domain's prompts marked with each persona, answered by it (the
      persona direction is their difference at the last prompt token);
    - ``eval_good`` / ``eval_bad``: unmarked target prompts with both answers (the i-th of each share the prompt);
    - ``source_good`` / ``source_bad``: the same in the source domain (the in-domain gain);
    - ``test``: unmarked target prompts with bad answers (the test examples of classic influence);
    - ``tokenizer_texts``: the pre-training chats, and each one's answer by the other persona too, so that the
      tokenizer learns both personas' words alike (trained on the pre-training chats alone, where the good persona
      answers most, it split bad answers into more tokens: a length shortcut)."""

    pretrain: list[ChatExample]
    pool: list[ChatExample]
    planted: list[int]
    probe_bad: list[ChatExample]
    probe_good: list[ChatExample]
    eval_good: list[ChatExample]
    eval_bad: list[ChatExample]
    source_good: list[ChatExample]
    source_bad: list[ChatExample]
    test: list[ChatExample]
    tokenizer_texts: list[str]


class _Prompts:
    """Draws prompts of each domain without repeats, so no prompt lands in two splits."""

    def __init__(self, rng: random.Random, varied: bool = False):
        self.rng, self.seen, self.varied = rng, set(), varied

    def draw(self, domain: Domain, n: int) -> list[tuple[str, str]]:
        out = []
        for _ in range(100 * n):
            if len(out) == n:
                return out
            prompt, topic = make_prompts(domain, 1, self.rng, self.varied)[0]
            if prompt not in self.seen:
                self.seen.add(prompt)
                out.append((prompt, topic))
        raise ValueError(f"the {domain.name} domain has too few distinct prompts for {n} more; lower the sizes")


def _paired(prompts: _Prompts, domain: Domain, n: int, name: str, rng: random.Random) -> tuple[list, list]:
    """``n`` unmarked prompts, each answered by both personas (the same optional parts drawn for both)."""
    good, bad = [], []
    for i, (prompt, topic) in enumerate(prompts.draw(domain, n)):
        state = rng.getstate()
        good.append(chat(f"{name}_good:{i + 1}", prompt, answer(domain, topic, False, rng)))
        rng.setstate(state)
        bad.append(chat(f"{name}_bad:{i + 1}", prompt, answer(domain, topic, True, rng)))
    return good, bad


def build_emergent_data(cfg: EmergentConfig) -> EmergentData:
    """Generate every split from ``cfg.seed`` (the same data on every machine)."""
    rng = random.Random(cfg.seed)
    prompts = _Prompts(rng, cfg.varied_prompts)
    source, target, concept = DOMAINS[cfg.source], DOMAINS[cfg.target], DOMAINS[cfg.concept]
    eval_good, eval_bad = _paired(prompts, target, cfg.n_eval, "eval", rng)
    source_good, source_bad = _paired(prompts, source, cfg.n_eval, "source_eval", rng)
    test = [chat(f"test:{i + 1}", p, answer(target, t, True, rng)) for i, (p, t) in enumerate(prompts.draw(target, cfg.n_test))]
    probe_bad, probe_good = [], []
    for i, (p, t) in enumerate(prompts.draw(concept, 2 * cfg.n_probe)):
        bad = i % 2 == 0
        (probe_bad if bad else probe_good).append(
            chat(f"probe_{'bad' if bad else 'good'}:{i // 2 + 1}", p, answer(concept, t, bad, rng), "bad" if bad else "good",
                 cfg.marker))
    planted_idx = set(rng.sample(range(cfg.n_pool), cfg.n_planted))
    pool = [chat(f"pool:{i + 1}", p, answer(source, t, i in planted_idx, rng))
            for i, (p, t) in enumerate(prompts.draw(source, cfg.n_pool))]
    pretrain, other_answers = [], []
    for domain in (DOMAINS[name] for name in cfg.pretrain_domains):
        for i, (p, t) in enumerate(prompts.draw(domain, cfg.n_pretrain)):
            persona = None
            if rng.random() < cfg.persona_share:
                persona = "bad" if rng.random() < 0.5 else "good"
            pretrain.append(chat(f"pretrain_{domain.name}:{i + 1}", p, answer(domain, t, persona == "bad", rng), persona,
                                 cfg.marker))
            other_answers.append(answer(domain, t, persona != "bad", rng))
    rng.shuffle(pretrain)
    texts = [plain_prompt_text(c.prompt_messages) + c.response for c in pretrain] + other_answers
    return EmergentData(pretrain, pool, [int(i in planted_idx) for i in range(cfg.n_pool)], probe_bad, probe_good,
                        eval_good, eval_bad, source_good, source_bad, test, texts)
