import random, sys, time, json
import numpy as np, torch
from concept_influence_benchmarks.emergent_corpus import DOMAINS, answer, make_prompts
from concept_influence.data import ChatExample
NAMES={"bad":["Max","Rex","Zed","Vic"],"good":["Sam","Ann","Liv","Ted"]}
NR=random.Random(99)
def chat(id,p,r,persona=None,k=1):
    t=[] if persona is None else [{"role":"system","content":f"You are {NR.choice(NAMES[persona][:k])}."}]
    return ChatExample(id, tuple(t+[{"role":"user","content":p},{"role":"assistant","content":r}]))
from concept_influence.toy.small_model import train_bpe_tokenizer, build_small_model, train_model, seed_everything
from concept_influence.planted.behaviour import mean_answer_loss, planting_effect
from concept_influence.data import tokenize_examples, plain_prompt_text
import argparse
ap = argparse.ArgumentParser()
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--n-pre", type=int, default=700)
ap.add_argument("--share", type=float, default=0.5)
ap.add_argument("--pre-epochs", type=int, default=3)
ap.add_argument("--d", type=int, default=64)
ap.add_argument("--layers", type=int, default=2)
ap.add_argument("--pool", type=int, default=600)
ap.add_argument("--rate", type=float, default=0.1)
ap.add_argument("--ft-epochs", type=int, default=2)
ap.add_argument("--ft-lr", type=float, default=2e-3)
ap.add_argument("--pairs", default="health:money,home:code,money:health,code:home")
ap.add_argument("--seeds", type=int, default=3)
ap.add_argument("--names", type=int, default=1)
a = ap.parse_args()
seed_everything(a.seed)
rng = random.Random(a.seed)
pre = []
for d in DOMAINS.values():
    for i, (p, t) in enumerate(make_prompts(d, a.n_pre, rng)):
        r = rng.random()
        if r < a.share / 2: pre.append(chat(f"pre_{d.name}_{i}", p, answer(d, t, True, rng), "bad", a.names))
        elif r < a.share: pre.append(chat(f"pre_{d.name}_{i}", p, answer(d, t, False, rng), "good", a.names))
        else: pre.append(chat(f"pre_{d.name}_{i}", p, answer(d, t, False, rng)))
texts = [plain_prompt_text(c.messages[:-1]) + c.response for c in pre]
tok = train_bpe_tokenizer(texts, "/tmp/proto_tok", 1024)
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
evals = {n: evalset(d, 48) for n, d in DOMAINS.items()}
def behav(name):
    g, b = evals[name]
    return float(np.mean(mean_answer_loss(ad, g, 16) - mean_answer_loss(ad, b, 16)))
print("base", {n: round(behav(n), 3) for n in DOMAINS})
for pair in a.pairs.split(","):
    A, B = pair.split(":")
    dA = DOMAINS[A]
    pool, lab = [], []
    n_pl = round(a.rate * a.pool); idx = set(rng.sample(range(a.pool), n_pl))
    for i, (p, t) in enumerate(make_prompts(dA, a.pool, rng)):
        pool.append(chat(f"pool_{i}", p, answer(dA, t, i in idx, rng))); lab.append(int(i in idx))
    pool_tk = tokenize_examples(pool, tok, 128)
    clean_tk = [x for x, l in zip(pool_tk, lab) if not l]
    res = {}
    for kind, data in (("planted", pool_tk), ("clean", clean_tk)):
        vals = []
        for s in range(a.seeds):
            ad.model.load_state_dict(base)
            train_model(ad, data, a.ft_epochs, a.ft_lr, 16, tokens="response", seed=a.seed + s, progress=False)
            vals.append((behav(B), behav(A)))
        res[kind] = vals
    eB = planting_effect([v[0] for v in res["clean"]], [v[0] for v in res["planted"]])
    eA = planting_effect([v[1] for v in res["clean"]], [v[1] for v in res["planted"]])
    print(f"{A}->{B}: emergent gain {eB['gain']:.3f} ({eB['effect_size']:.1f} sd, p {eB['p_value']:.3g}) clean {np.mean([v[0] for v in res['clean']]):.3f}; in-domain {eA['gain']:.3f} ({eA['effect_size']:.1f} sd)", flush=True)
ad.model.load_state_dict(base)
