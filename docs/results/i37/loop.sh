#!/usr/bin/env bash
# usage: loop.sh N tag ; launches pairs (2 steps, then resume to 4) of 2-process smoke pretraining
cd /work/main; N=$1; tag=$2; log=/tmp/ddp37/$tag.log; : > $log
for i in $(seq 1 $N); do for m in ssmtl_plus simsiam; do
  out=/tmp/ddp37/o-$tag; rm -rf $out
  A="pretrain --method $m --manifest data/phantom-smoke/manifest.json --profile smoke --out $out --set batch_size=4 --set checkpoint_every=2 --device cpu --nproc 2"
  for phase in "--steps 2" "--steps 4 --resume"; do
    o=$(PYTHONFAULTHANDLER=1 OMP_NUM_THREADS=1 .venv/bin/medssl $A $phase 2>&1); rc=$?
    t=$(grep -c "terminate called" <<< "$o")
    echo "$i $m ${phase// /_} rc=$rc terminate=$t" >> $log
    [ $rc != 0 ] && echo "$o" | grep -v "it/s" | tail -40 >> $log
  done
done; done
