#!/bin/bash
for s in 0 1 2; do echo "== seed $s"; OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python runs/proto2.py --seed $s --n-eval 200 --seeds 5 --freeze embed,pos_embed,unembed --schedule linear --pairs health:money,money:health,health:home --ft 0.1:2:2e-3,0.2:2:2e-3 2>&1 | grep --line-buffered -v Warn | grep --line-buffered -v "sum :"; done > runs/grid9.log
