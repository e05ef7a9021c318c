# Two entry points: `make demo` and `make test`. Each creates the environment when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch is installed first so that the stack below does not pull the CUDA build.
TORCH_SPEC ?= torch==2.13.*
DEMO_OUT ?= runs/demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo demo-quick test lint docs notebooks bench bench-gpt2 bench-queries bench-causal bench-memory bench-medical bench-medical-sae bench-index bench-lora gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# kronfluence (compared against in tests and the speed benchmark): --no-deps, or its requirements pull CUDA torch
	$(PY) -m pip install -q --no-deps kronfluence==1.0.1 einconv opt_einsum
	# Bergson (compared against in the speed benchmark): --no-deps, or torchvision, torchaudio and bitsandbytes pull
	# CUDA torch; of what the stack above lacks, its EK-FAC path imports only ml_dtypes and petname, and its approximate
	# unrolling (SOURCE, compared against in tests/test_unrolled.py) torchopt, optree and graphviz (pure Python here)
	$(PY) -m pip install -q --no-deps bergson==2.5.1 ml_dtypes==0.6.0 petname==2.9 torchopt==0.7.3 optree==0.20.0 graphviz==0.21
	touch $@

demo: install
	$(VENV)/bin/concept-influence demo --out $(DEMO_OUT)

demo-quick: install
	$(VENV)/bin/concept-influence demo --out $(DEMO_OUT) --quick

# Lint (ruff: pycodestyle, pyflakes, import order) and then the suite, which also executes the notebooks at their
# reduced size without writing them back: one pytest-xdist worker per core (every test runs torch on one thread;
# tests that share an expensive module fixture carry one xdist_group mark, so that one worker builds it once), and the
# slowest tests listed at the end.
TEST_WORKERS ?= auto
test: install lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15

lint: install
	$(VENV)/bin/ruff check .

# The documentation site (docs/, mkdocs.yml; the API and command-line references are generated at build time by
# docs/hooks/generated.py) into site/; --strict turns every broken link or missing reference into an error.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# Re-execute every notebook at its full size and write the outputs back into it (what is committed; ~15 min).
notebooks: install
	CONCEPT_INFLUENCE_NOTEBOOK_QUICK=0 OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider --nbmake --overwrite \
		--nbmake-timeout=3600 notebooks

bench: install
	$(VENV)/bin/concept-influence bench speed --out benchmarks

# Every stage per example on a random model of GPT-2-small shape against the floor, with kronfluence and Bergson
# (about 1 h on 2 cores: three runs of each compared pipeline, and K = 16; benchmarks/speed-gpt2-small.md)
bench-gpt2: install
	$(VENV)/bin/concept-influence bench speed --size gpt2-small --out benchmarks

# The steering check at the strongest medical plantings, and the table of where the concept is causal.
bench-causal: install
	for e in 2 6; do OMP_NUM_THREADS=1 $(VENV)/bin/concept-influence bench medical --data $(EM_DATA) --rate 0.5 \
		--finetune-epochs $$e --seed 0 --no-retrain --no-checkpoints --compare-query none \
		--out runs/causal/rate0.5-ep$$e --no-progress; \
		mkdir -p benchmarks/medical-causal/rate0.5-ep$$e && cp runs/causal/rate0.5-ep$$e/results.* \
		runs/causal/rate0.5-ep$$e/*.png benchmarks/medical-causal/rate0.5-ep$$e/; done
	$(VENV)/bin/concept-influence bench check-table \
		$(foreach r,demo-s0 demo-s1 demo-s2 medical-0.1-s0 medical-0.1-s1 medical-0.05-s0,$(r)=benchmarks/queries/$(r)/results.json) \
		medical-0.5-ep2=benchmarks/medical-causal/rate0.5-ep2/results.json \
		medical-0.5-ep6=benchmarks/medical-causal/rate0.5-ep6/results.json \
		insecure-0.1-s0=benchmarks/queries/insecure-0.1-s0/results.json \
		--title "Where is the concept causal? The demo and the medical search" --out benchmarks/medical-causal/README.md

# The gradient index against exact scoring and Bergson's index: GPT-2-small shape, query time over 10k and 100k rows,
# the demo over 5 seeds (benchmarks/index.md), the medical benchmark over 5 seeds (index-medical.md), and the rank an
# index needs at GPT-2 shape with random weights (index_rank_curve.md). Seeds already in a report are kept.
bench-index: install
	OMP_NUM_THREADS=1 $(VENV)/bin/concept-influence bench index --out benchmarks
	OMP_NUM_THREADS=1 $(VENV)/bin/concept-influence bench index --part medical --data $(EM_DATA) --out benchmarks
	OMP_NUM_THREADS=1 $(VENV)/bin/python benchmarks/index_rank_curve.py > benchmarks/index_rank_curve.md.part
	mv benchmarks/index_rank_curve.md.part benchmarks/index_rank_curve.md

# Peak RSS of scoring 1k vs 50k examples through run folders (about 10 min on 2 cores).
bench-memory: install
	OMP_NUM_THREADS=1 $(VENV)/bin/concept-influence bench memory --out benchmarks

# The committed medical results: about an hour per rate on 2 cores (one torch thread per run). They predate the query
# study, so the settings they were made with are pinned here (OLD_CONCEPT); the query study covers today's defaults.
EM_DATA ?= ../shared/data/em
OLD_CONCEPT := --probe-kind logistic --layer 0 --query response_mean --compare-query none --lds-seeds 1
bench-medical: install
	OMP_NUM_THREADS=1 $(VENV)/bin/concept-influence bench medical --data $(EM_DATA) --rate 0.1 --lds 10 $(OLD_CONCEPT) --out runs/medical-0.1
	OMP_NUM_THREADS=1 $(VENV)/bin/concept-influence bench medical --data $(EM_DATA) --rate 0.05 $(OLD_CONCEPT) --out runs/medical-0.05
	for r in 0.1 0.05; do mkdir -p benchmarks/medical-rate$$r && cp runs/medical-$$r/results.md runs/medical-$$r/results.json runs/medical-$$r/*.png benchmarks/medical-rate$$r/; done

# SAE-latent concepts on the medical benchmark (rate 0.1): about an hour on 2 cores with filter-and-retrain
# (add --no-retrain for retrieval only, about 15 minutes).
bench-medical-sae: install
	OMP_NUM_THREADS=1 $(VENV)/bin/concept-influence bench medical --data $(EM_DATA) --rate 0.1 --sae-latents 512 --sae-k 16 $(OLD_CONCEPT) --out runs/medical-sae-0.1
	mkdir -p benchmarks/medical-sae && cp runs/medical-sae-0.1/results.md runs/medical-sae-0.1/results.json runs/medical-sae-0.1/*.png benchmarks/medical-sae/

# The medical benchmark on a pre-trained model (MODEL: a Hugging Face causal LM folder, e.g. Qwen2.5-0.5B-Instruct saved
# with save_pretrained): every fine-tune is a rank-8 LoRA fine-tune in bfloat16 on one GPU (install with TORCH_SPEC=torch),
# sized to finish in under 10 minutes at 0.5B parameters (26 one-epoch LoRA fine-tunes of 400 chats; an estimate:
# UNTESTED on a GPU, none was lent to this work; the same command runs on CPU with a tiny model in tests/test_bench_model.py).
MODEL ?= models/qwen2.5-0.5b-instruct
bench-lora: install
	$(VENV)/bin/concept-influence bench medical --data $(EM_DATA) --rate 0.1 --model $(MODEL) --lora-rank 8 \
		--dtype bfloat16 --device cuda --n-pool 400 --n-probe 100 --n-eval 64 --n-seeds 2 --finetune-epochs 1 \
		--finetune-lr 2e-4 --max-length 256 --compare-query none --out runs/medical-lora

# The GPU check (issue 27, item 5; docs/scale.md): Concept Influence on a Qwen2.5-7B-shape model (random bf16 weights,
# LoRA r = 16 on all 7 linear maps), planned for the device's memory and then run: each stage's time and peak memory
# beside the plan's, and bf16 on CUDA against fp32 on the CPU at reduced width; writes benchmarks/gpu-check.md and .json and
# exits with status 1 when a check fails. Sized for one 80 GB H100 in under 8 minutes (an estimate: it has not run on a
# GPU yet). It needs torch with CUDA, transformers and peft, not `make install`: on a lent GPU machine, which has them
# but no network, `make gpu-check GPU_PY=python3`. The same code at a tiny size on the CPU is tests/test_gpu_check.py.
GPU_PY ?= $(PY)
gpu-check:
	PYTHONPATH=. PYTHONUNBUFFERED=1 $(GPU_PY) -m concept_influence bench gpu-check --size qwen2.5-7b --device cuda --out benchmarks

clean:
	rm -rf $(VENV) runs

# The query study (issue 12): every concept-query variant scored on one trained model per benchmark and seed (the
# demo with filter-and-retrain; medical and insecure code retrieval only), merged into benchmarks/query_study.md.
# About 75 minutes on 2 cores, one torch thread per run, one run at a time.
INSECURE := --clean $(EM_DATA)/secure.500.jsonl --planted $(EM_DATA)/insecure.jsonl --rate 0.1 --n-probe 100 \
	--n-pretrain 150 --n-pool 200 --n-eval 40 --max-length 512 --d-model 64 --pretrain-epochs 4
bench-queries: install
	for s in 0 1 2; do OMP_NUM_THREADS=1 $(VENV)/bin/concept-influence demo --out runs/demo-s$$s --seed $$s --query-study --no-progress; done
	for s in 0 1; do OMP_NUM_THREADS=1 $(VENV)/bin/concept-influence bench medical --data $(EM_DATA) --rate 0.1 --seed $$s \
		--no-retrain --query-study --out runs/medical-0.1-s$$s --no-progress; done
	OMP_NUM_THREADS=1 $(VENV)/bin/concept-influence bench medical --data $(EM_DATA) --rate 0.05 --seed 0 --no-retrain \
		--query-study --out runs/medical-0.05-s0 --no-progress
	OMP_NUM_THREADS=1 $(VENV)/bin/concept-influence bench planted $(INSECURE) --seed 0 --no-retrain --query-study \
		--out runs/insecure-0.1-s0 --no-progress
	$(VENV)/bin/concept-influence bench query-table demo-s0=runs/demo-s0/query_study.json \
		demo-s1=runs/demo-s1/query_study.json demo-s2=runs/demo-s2/query_study.json \
		medical-0.1-s0=runs/medical-0.1-s0/query_study.json \
		medical-0.1-s1=runs/medical-0.1-s1/query_study.json medical-0.05-s0=runs/medical-0.05-s0/query_study.json \
		insecure-0.1-s0=runs/insecure-0.1-s0/query_study.json --out benchmarks/query_study.md
	for r in demo-s0 demo-s1 demo-s2 medical-0.1-s0 medical-0.1-s1 medical-0.05-s0 insecure-0.1-s0; do mkdir -p benchmarks/queries/$$r && \
		cp runs/$$r/results.md runs/$$r/results.json runs/$$r/query_study.json runs/$$r/*.png benchmarks/queries/$$r/; done

# The emergent testbed (issue 19): two domain pairs x five seeds, each run about 13 minutes on 2 cores with one torch
# thread, then the tables over seeds and the curvature study. A run whose results are committed is not run again
# (delete its folder under benchmarks/emergent/ to redo it).
EMERGENT_PAIRS ?= health:money money:health
SEEDS ?= 0 1 2 3 4
EMERGENT_RUNS = $(foreach p,$(EMERGENT_PAIRS),$(foreach s,$(SEEDS),\
	$(subst :,-,$(p))-s$(s)=benchmarks/emergent/$(subst :,-,$(p))-s$(s)/results.json))
bench-emergent: install
	for p in $(EMERGENT_PAIRS); do src=$${p%%:*}; tgt=$${p##*:}; for s in $(SEEDS); do r=$$src-$$tgt-s$$s; \
		test -f benchmarks/emergent/$$r/results.json || { OMP_NUM_THREADS=1 $(VENV)/bin/concept-influence bench emergent \
		--source $$src --target $$tgt --seed $$s --out runs/emergent/$$r --no-progress && mkdir -p benchmarks/emergent/$$r && \
		cp runs/emergent/$$r/results.* runs/emergent/$$r/*.png benchmarks/emergent/$$r/; } || exit 1; done; \
		$(VENV)/bin/concept-influence bench seeds-table $(foreach s,$(SEEDS),s$(s)=benchmarks/emergent/$$src-$$tgt-s$(s)/results.json) \
		--title "Emergent testbed, $$src -> $$tgt, over seeds" --out benchmarks/emergent/$$src-$$tgt.md; done
	$(VENV)/bin/concept-influence bench seeds-table $(EMERGENT_RUNS) --title "Emergent testbed, every pair and seed" \
		--out benchmarks/emergent/README.md
	$(VENV)/bin/concept-influence bench curvature-table $(EMERGENT_RUNS) \
		--title "Curvature study on the emergent testbed" --out benchmarks/emergent/curvature_study.md

# The demo over seeds (issue 19), each run with the curvature study (about 10 minutes each on 2 cores, one torch thread).
DEMO_SEEDS ?= 0 1 2 3 4
bench-demo-seeds: install
	for s in $(DEMO_SEEDS); do test -f benchmarks/demo-seeds/demo-s$$s/results.json || { OMP_NUM_THREADS=1 \
		$(VENV)/bin/concept-influence demo --out runs/demo-seeds/demo-s$$s --seed $$s --curvature-study --no-progress && \
		mkdir -p benchmarks/demo-seeds/demo-s$$s && cp runs/demo-seeds/demo-s$$s/results.* runs/demo-seeds/demo-s$$s/*.png \
		benchmarks/demo-seeds/demo-s$$s/; } || exit 1; done
	$(VENV)/bin/concept-influence bench seeds-table $(foreach s,$(DEMO_SEEDS),s$(s)=benchmarks/demo-seeds/demo-s$(s)/results.json) \
		--title "The demo over seeds" --out benchmarks/demo-seeds/README.md
	$(VENV)/bin/concept-influence bench curvature-table $(foreach s,$(DEMO_SEEDS),s$(s)=benchmarks/demo-seeds/demo-s$(s)/results.json) \
		--title "Curvature study on the demo" --out benchmarks/demo-seeds/curvature_study.md
