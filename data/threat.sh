#!/usr/bin/env bash
# Rebuild the threat-model partitions of data/fashion-mnist (provenance: data/README.md).
#   data/threat.sh [DEVICE]      DEVICE: cpu (default; hours) or cuda (minutes on one GPU)
# Environment: PRODUCE (default .venv/bin/logitguard-produce), ROOT (Fashion-MNIST IDX folder), and
# STEPS, BARE_STEPS, RELABEL_STEPS, TEST_SAMPLES, ATTACKER_SAMPLES, QUERY_SAMPLES, QUERIES to resize the run.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cpu}
PRODUCE=${PRODUCE:-.venv/bin/logitguard-produce}
ROOTARG=${ROOT:+--root $ROOT}
TABLE=${TABLE:-data/fashion-mnist}
MODEL=data/fashion-mnist-cnn
SUBSTITUTE=${SUBSTITUTE:-data/fashion-mnist-substitute}
N=${TEST_SAMPLES:-1000}
COMMON="--dataset fashion-mnist $ROOTARG --device $DEVICE --seed 0"
E8="fgsm-e8=fgsm,bim-e8=bim,pgd-e8=pgd,mim-e8=mim"
E8_PARAMS="--param fgsm-e8.eps=8/255 --param bim-e8.eps=8/255 --param pgd-e8.eps=8/255 --param pgd-e8.alpha=1/255
           --param mim-e8.eps=8/255"

# Transfer: the attacker's substitute differs from the target in seed and width.
test -f $SUBSTITUTE.pt || $PRODUCE train $COMMON --width 16 --seed 1 --epochs ${SUB_EPOCHS:-6} --out $SUBSTITUTE
# Oblivious at 8/255 (16/255 is in the table already), then transfer at both budgets.
$PRODUCE export $COMMON --model $MODEL --splits test --test-samples "$N" --attacks "$E8" $E8_PARAMS --out "$TABLE"
$PRODUCE export $COMMON --model $MODEL --splits test --test-samples "$N" --attacks "fgsm,bim,pgd,mim,$E8" $E8_PARAMS \
    --substitute $SUBSTITUTE --out "$TABLE"
# Adaptive (the defense's files): the sequenced suite (each attack only on the samples still robust), judged on
# 5 fresh noise draws the attacker never saw; the bare model meets the same gradient attacks, so a pipeline's
# gain is measured against an equally strong baseline. Then the surrogate tier (an own copy fitted on unused
# training samples) and the query tier (the deployed pipeline's answers only, first QUERY_SAMPLES samples).
THROUGH="$COMMON --model $MODEL --defenses data/defenses/defenses.json --budgets 16/255,8/255 --test-samples $N
         --batch-size 500 --judge-draws 5"
GATED='["apgd-ce","orthogonal-pgd","lagrangian",["apgd-t",{"targets":2}]]'
BARE='["apgd-ce","apgd-dlr",["apgd-t",{"targets":3}]]'
$PRODUCE attack-defenses $THROUGH --tier adaptive --pipelines none --attacks suite --param steps=${BARE_STEPS:-50} \
    --param restarts=1 --param "sequence=$BARE" --out "$TABLE"
$PRODUCE attack-defenses $THROUGH --tier adaptive --pipelines ln-reject,ln-agree --attacks suite \
    --param steps=${STEPS:-25} --param restarts=1 --param eot=1 --param "sequence=$GATED" --out "$TABLE"
# Continuations at 16/255, each only on the samples every earlier partition left unbroken: APGD-CE with EOT
# over 4 draws, then APGD-T towards each of the top 3 wrong classes with EOT over 2 draws and 80 steps.
CONTINUE="$COMMON --model $MODEL --defenses data/defenses/defenses.json --budgets 16/255 --test-samples $N
          --batch-size 500 --judge-draws 5 --tier adaptive --pipelines ln-reject,ln-agree --param restarts=1"
$PRODUCE attack-defenses $CONTINUE --attacks apgd-ce --param steps=30 --param eot=4 --after suite --out "$TABLE"
$PRODUCE attack-defenses $CONTINUE --attacks apgd-t --param targets=3 --param steps=80 --param eot=2 \
    --after suite,apgd-ce --out "$TABLE"
# Then a Lagrangian that fools the model first (multiplier from 0.01, margin 2), EOT over 4 draws, 200 steps.
$PRODUCE attack-defenses $CONTINUE --attacks lagrangian --param steps=200 --param eot=4 --param kappa=2 \
    --param lambda_init=0.01 --param lambda_min=0.001 --param update_every=10 \
    --after routes,defended-pgd,suite,apgd-ce,apgd-t --out "$TABLE"
# And once more, deeper first (margin 4, multiplier from 0.001), under the alias lagrangian-fool.
$PRODUCE attack-defenses $CONTINUE --attacks lagrangian-fool=lagrangian --param steps=200 \
    --param eot=4 --param kappa=4 --param lambda_init=0.001 --param lambda_min=0.0001 --param update_every=10 \
    --after routes,defended-pgd,suite,apgd-ce,apgd-t,lagrangian --out "$TABLE"
# Then the same fool-first Lagrangian towards each of the top 3 wrong classes (100 steps, EOT 4; it broke
# nothing through either pipeline, and stays because later continuations name it).
FOOL="--param kappa=2 --param lambda_init=0.01 --param lambda_min=0.001 --param update_every=10"
$PRODUCE attack-defenses $CONTINUE --attacks lagrangian-t=lagrangian --param targets=3 --param steps=100 \
    --param eot=4 $FOOL --after routes,defended-pgd,suite,apgd-ce,apgd-t,lagrangian,lagrangian-fool --out "$TABLE"
# Last, only on the samples the bare model's suite broke (the guard's whole gain rests on them): the
# fool-first Lagrangian with EOT 8 that submits its nearest miss when it never saw a success (fallback).
# (ln-agree's ran beside its lagrangian-t, so it continues the partitions before that one.)
NEAR="--attacks lagrangian-near=lagrangian --param fallback=true --param steps=200 --param eot=8 $FOOL
      --focus none:suite --out $TABLE"
$PRODUCE attack-defenses ${CONTINUE/ln-reject,ln-agree/ln-reject} $NEAR \
    --after routes,defended-pgd,suite,apgd-ce,apgd-t,lagrangian,lagrangian-fool,lagrangian-t
$PRODUCE attack-defenses ${CONTINUE/ln-reject,ln-agree/ln-agree} $NEAR \
    --after routes,defended-pgd,suite,apgd-ce,apgd-t,lagrangian,lagrangian-fool
# And through ln-agree, on the same focused samples, APGD-T towards the top 3 wrong classes with EOT 8, 100 steps.
$PRODUCE attack-defenses ${CONTINUE/ln-reject,ln-agree/ln-agree} --attacks apgd-t-deep=apgd-t --param targets=3 \
    --param steps=100 --param eot=8 --focus none:suite --out "$TABLE" \
    --after routes,defended-pgd,suite,apgd-ce,apgd-t,lagrangian,lagrangian-fool,lagrangian-t,lagrangian-near
$PRODUCE attack-defenses $THROUGH --tier adaptive --pipelines corrector,ln-corrector,ln-odds,odds-odds \
    --attacks routes --param steps=${RELABEL_STEPS:-30} --param restarts=1 --out "$TABLE"
$PRODUCE attack-defenses $THROUGH --tier surrogate --attacks routes --param steps=${STEPS:-100} \
    --attacker-samples "${ATTACKER_SAMPLES:-5000}" --workdir "${WORKDIR:-data/.surrogate-work}" --out "$TABLE"
$PRODUCE attack-defenses $COMMON --model $MODEL --defenses data/defenses/defenses.json --tier query \
    --pipelines none,ln-reject --attacks square,rays --budgets 16/255 --test-samples "${QUERY_SAMPLES:-100}" \
    --param queries=${QUERIES:-1000} --batch-size 100 --judge-draws 5 --out "$TABLE"
