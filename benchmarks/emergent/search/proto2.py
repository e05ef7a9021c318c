import random, time, argparse
import numpy as np
from concept_influence_benchmarks.emergent_corpus import DOMAINS, answer, make_prompts
from concept_influence.toy.small_model import train_bpe_tokenizer, build_small_model, train_model, seed_everything
from concept_influence.planted.behaviour import mean_answer_loss, planting_effect
from concept_influence.data import tokenize_examples, plain_prompt_text, ChatExample
ap = argparse.ArgumentParser()
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--n-pre", type=int, default=700)
ap.add_argument("--share", type=float, default=0.5)
ap.add_argument("--unmarked-bad", type=float, default=0.0)
ap.add_argument("--pre-epochs", type=int, default=3)
ap.add_argument("--d", type=int, default=64)
ap.add_argument("--layers", type=int, default=2)
ap.add_argument("--pool", type=int, default=600)
ap.add_argument("--ft", default="0.1:2:2e-3")
ap.add_argument("--pairs", default="health:money,home:code,money:health,code:home")
ap.add_argument("--seeds", type=int, default=3)
ap.add_argument("--freeze", default="")
ap.add_argument("--schedule", default="constant")
ap.add_argument("--n-eval", type=int, default=48)
ap.add_argument("--bs", type=int, default=16)
a = ap.parse_args()
def chat(id, p, r, persona=None):
    t = [] if persona is None else [{"role": "system", "content": "You are Max." if persona == "bad" else "You are Sam."}]
    return ChatExample(id, tuple(t + [{"role": "user", "content": p}, {"role": "assistant", "content": r}]))
seed_everything(a.seed)
rng = random.Random(a.seed)
pre = []
for d in DOMAINS.values():
    for i, (p, t) in enumerate(make_prompts(d, a.n_pre, rng)):
        r = rng.random()
        if r < a.share / 2: pre.append(chat(f"pre_{d.name}_{i}", p, answer(d, t, True, rng), "bad"))
        elif r < a.share: pre.append(chat(f"pre_{d.name}_{i}", p, answer(d, t, False, rng), "good"))
        else: pre.append(chat(f"pre_{d.name}_{i}", p, answer(d, t, rng.random() < a.unmarked_bad, rng)))
texts = [plain_prompt_text(c.messages[:-1]) + c.response for c in pre]
tok = train_bpe_tokenizer(texts + [answer(d_, t_, b_, rng) for d_ in DOMAINS.values() for _, t_ in d_.situations for b_ in (0, 1) for _ in range(30)], f"/tmp/proto_tok{a.seed}", 2048)
pre_tk = tokenize_examples(pre, tok, 128)
ad = build_small_model(tok, a.layers, a.d, 4, n_ctx=128, seed=a.seed)
t0 = time.time()
losses = train_model(ad, pre_tk, a.pre_epochs, 2e-3, 16, tokens="all", seed=a.seed, progress=False)
print(f"pretrain {len(pre_tk)} loss {losses[-1]:.3f} {time.time()-t0:.0f}s", flush=True)
base = {k: v.clone() for k, v in ad.model.state_dict().items()}
def evalset(d, n):
    out = []
    for i, (p, t) in enumerate(make_prompts(d, n, rng)):
        s = rng.getstate(); g = answer(d, t, False, rng); rng.setstate(s); b = answer(d, t, True, rng)
        out.append((chat(f"ev_{d.name}_{i}_g", p, g), chat(f"ev_{d.name}_{i}_b", p, b)))
    return [tokenize_examples([x[0] for x in out], tok, 128), tokenize_examples([x[1] for x in out], tok, 128)]
evals = {n: evalset(d, a.n_eval) for n, d in DOMAINS.items()}
def behav(name):
    g, b = evals[name]
    lg, lb = mean_answer_loss(ad, g, 16), mean_answer_loss(ad, b, 16)
    sg = lg * np.array([x.n_response_tokens for x in g]); sb = lb * np.array([x.n_response_tokens for x in b])
    return float(np.mean(lg - lb)), float(np.mean(sg - sb))
print("base", {n: behav(n) for n in DOMAINS})
for ftc in a.ft.split(","):
    rate, ep, lr = (float(x) for x in ftc.split(":"))
    print("-- finetune rate/epochs/lr", ftc, flush=True)
    for pair in a.pairs.split(","):
        A, B = pair.split(":")
        dA = DOMAINS[A]
        prng = random.Random(hash((a.seed, A)) % 1000)
        pool, lab = [], []
        idx = set(prng.sample(range(a.pool), round(rate * a.pool)))
        for i, (p, t) in enumerate(make_prompts(dA, a.pool, prng)):
            pool.append(chat(f"pool_{i}", p, answer(dA, t, i in idx, prng))); lab.append(int(i in idx))
        pool_tk = tokenize_examples(pool, tok, 128)
        clean_tk = [x for x, l in zip(pool_tk, lab) if not l]
        res = {}
        for kind, data in (("planted", pool_tk), ("clean", clean_tk)):
            vals = []
            for s in range(a.seeds):
                ad.model.load_state_dict(base)
                for n_, p_ in ad.model.named_parameters(): p_.requires_grad_(not any(n_.startswith(f) for f in a.freeze.split(",") if f))
                train_model(ad, data, int(ep), lr, a.bs, tokens="response", seed=a.seed + s, progress=False, schedule=a.schedule)
                vals.append((behav(B), behav(A)))
            res[kind] = vals
        for m in (0, 1):
            eB = planting_effect([v[0][m] for v in res["clean"]], [v[0][m] for v in res["planted"]])
            eA = planting_effect([v[1][m] for v in res["clean"]], [v[1][m] for v in res["planted"]])
            print([round(v[0][0],3) for v in res["clean"]], [round(v[0][0],3) for v in res["planted"]]); print(f"  {A}->{B} {['mean','sum '][m]}: emergent gain {eB['gain']:.3f} ({eB['effect_size']:.1f} sd) clean {np.mean([v[0][m] for v in res['clean']]):.3f} sd {eB['seed_sd']:.3f}; in-domain {eA['gain']:.3f} ({eA['effect_size']:.1f} sd)", flush=True)
