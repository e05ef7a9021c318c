#!/bin/bash
for s in 1 2; do echo "== seed $s"; OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python runs/proto2.py --seed $s --freeze embed,pos_embed,unembed --schedule linear --ft 0.1:2:2e-3 --pairs health:money,home:money,code:money,health:home,money:health 2>&1 | grep --line-buffered -v Warn | grep --line-buffered -v "sum :"; done > runs/grid6.log
OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python runs/demo_study.py 0,1,2,3,4,5,6,7 > runs/demo_study.log 2>&1
