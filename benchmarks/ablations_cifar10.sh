#!/usr/bin/env bash
# Ablations on CIFAR-10 (issue 9): attention or not, mask sampling, mask ratio, position table.
#
# Usage: bash benchmarks/ablations_cifar10.sh DATA OUT
#   DATA  shard folder: train-000000..000039.tar (50,000 images) and val-000000..000007.tar
#         (the 10,000 test images), both shuffled, 1,250 per shard. Built here from
#         $MAE_DATASETS/cifar10/{train,test}.tar.gz (benchmarks/datasets.py) when DATA has
#         no train-index.json.
#   OUT   one folder per arm (pt/, lp_cls/, lp_avg/, ft/), runs.tsv (each command and its
#         wall time); the table goes into BENCHMARKS.md (between the ablation markers).
# Run it from the repository root, alone on the machine (timings are part of the table).
# An interrupted run resumes: a stage whose results are already in OUT is skipped.
#
# Budget, fixed before running; every arm gets the same (about 90 min on 2 CPU cores):
#   pretrain  mae_vit_tiny_patch4_32 (ViT-Tiny, 32 px, 4 px patches), 2 epochs over 15,000
#             train images (train-000000..000011: 30,000 images seen), batch 128,
#             blr 1.5e-3, warm-up 0.5 epoch, norm-pix loss; val loss on val-000000.
#             Baseline: attention, random masks, ratio 0.75, 2-D sin-cos table, seed 0.
#             Each other arm changes one thing: mixer=feedforward; mask_sampling=block or
#             grid; mask_ratio 0.5 or 0.9; pos_embed sincos1d, learned or none; seed 1.
#   probe     frozen encoder, features cached, 5,000 train images (train-000000..000003),
#             90 epochs of LARS (the stage's defaults), k-NN (k=20, T=0.07) on the same
#             features; cls token and average pooling, each its own run; 2,500 test
#             images (val-000000..000001). Also for the two encoders at random init.
#   fine-tune (encoder block only) 1 epoch over 10,000 train images (train-000000..000007),
#             batch 128, warm-up 0.2 epoch, the stage's defaults otherwise (RandAugment,
#             Mixup/CutMix, drop path 0.1, layer decay 0.65); from scratch with
#             layer_decay=1.0 (the MAE paper's from-scratch recipe); 2,500 test images.
#             Also the baseline's seed 1, for the fine-tune spread.
# One seed per arm; the baseline's second seed gives the seed-to-seed spread.
#
# STAGE_PREFIX, if set, goes before each stage's command (e.g. "flock LOCKFILE" or "srun").
# ABLATION_SMOKE=1 runs every arm and stage on 300 train / 200 test images (1 epoch, small
# batches, a few minutes) and writes the table to OUT/BENCHMARKS.md instead: it checks the
# script, its numbers mean nothing.
set -euo pipefail

DATA=${1:?usage: $0 DATA OUT}
OUT=${2:?usage: $0 DATA OUT}
mkdir -p "$DATA" "$OUT"

if [[ "${ABLATION_SMOKE:-0}" == 1 ]]; then
    PER_SHARD=100; BUILD_LIMIT=(--max-per-class 30); TEST_LIMIT=(--max-per-class 20)
    PT_TRAIN="$DATA/train-{000000..000001}.tar"; PT_VAL="$DATA/val-000000.tar"
    PROBE_TRAIN="$DATA/train-{000000..000001}.tar"; TEST="$DATA/val-{000000..000001}.tar"
    FT_TRAIN="$DATA/train-{000000..000001}.tar"
    PT=(epochs=1 warmup_epochs=0.5 batch_size=32); PROBE=(epochs=2 warmup_epochs=1 batch_size=64)
    FT=(epochs=1 warmup_epochs=0.2 batch_size=32)
    TABLE="$OUT/BENCHMARKS.md"
else
    PER_SHARD=1250; BUILD_LIMIT=(); TEST_LIMIT=()
    PT_TRAIN="$DATA/train-{000000..000011}.tar"; PT_VAL="$DATA/val-000000.tar"
    PROBE_TRAIN="$DATA/train-{000000..000003}.tar"; TEST="$DATA/val-{000000..000001}.tar"
    FT_TRAIN="$DATA/train-{000000..000007}.tar"
    PT=(epochs=2 warmup_epochs=0.5 batch_size=128); PROBE=(); FT=(epochs=1 warmup_epochs=0.2 batch_size=128)
    TABLE=BENCHMARKS.md
fi
COMMON=(progress=false log_every=20)

# -- shards (once)
if [[ ! -f "$DATA/train-index.json" || ! -f "$DATA/val-index.json" ]]; then
    CIFAR=${MAE_DATASETS:?DATA holds no shards: set MAE_DATASETS to a folder holding cifar10/train.tar.gz and cifar10/test.tar.gz (benchmarks/datasets.py)}/cifar10
    SRC=$(mktemp -d)
    trap 'rm -rf "$SRC"' EXIT
    ${STAGE_PREFIX:-} tar -xzf "$CIFAR/train.tar.gz" -C "$SRC"
    ${STAGE_PREFIX:-} tar -xzf "$CIFAR/test.tar.gz" -C "$SRC"
    ${STAGE_PREFIX:-} python -m shards build "$SRC/train" "$DATA" --prefix train --samples-per-shard "$PER_SHARD" --shuffle "${BUILD_LIMIT[@]}"
    ${STAGE_PREFIX:-} python -m shards build "$SRC/test" "$DATA" --prefix val --samples-per-shard "$PER_SHARD" --shuffle "${TEST_LIMIT[@]}"
fi

# run ARM STAGE DONE_FILE COMMAND...: skip when DONE_FILE exists, else time the command into runs.tsv
run() {
    local arm=$1 stage=$2 done_file=$3
    shift 3
    if [[ -f "$done_file" ]]; then echo "== $arm/$stage: done before, skipped"; return; fi
    echo "== $arm/$stage start $(date -u +%FT%TZ)"
    local start=$SECONDS
    ${STAGE_PREFIX:-} "$@"
    printf '%s\t%s\t%s\t%s\n' "$arm" "$stage" "$((SECONDS - start))" "$*" >> "$OUT/runs.tsv"
}

# -- arms: name and what it changes from the baseline (pretraining keys)
declare -A ARMS=(
    [baseline]="" [seed1]="seed=1" [feedforward]="model_overrides.mixer=feedforward"
    [block]="mask_sampling=block" [grid]="mask_sampling=grid" [ratio0.5]="mask_ratio=0.5" [ratio0.9]="mask_ratio=0.9"
    [sincos1d]="model_overrides.pos_embed=sincos1d" [learned]="model_overrides.pos_embed=learned"
    [nopos]="model_overrides.pos_embed=none"
)
ORDER=(baseline feedforward block grid ratio0.5 ratio0.9 sincos1d learned nopos seed1)
SCRATCH_MODELS=([0]=vit_tiny_patch16_224 [1]=vit_ff_tiny_patch16_224)
SCRATCH_NAMES=(scratch scratch_ff)
SCRATCH_KW=(pretrained=none model_kwargs.img_size=32 model_kwargs.patch_size=4)

seed_of() { [[ $1 == seed1 ]] && echo "seed=1" || echo "seed=0"; }

for arm in "${ORDER[@]}"; do
    read -r -a change <<< "${ARMS[$arm]}"
    run "$arm" pretrain "$OUT/$arm/pt/encoder.safetensors" python -m pipelines.pretrain output_dir="$OUT/$arm/pt" \
        data.train="$PT_TRAIN" data.val="$PT_VAL" "${PT[@]}" "${COMMON[@]}" "${change[@]}"
done

probe() {  # probe ARM SEED ENCODER_ARGS...
    local arm=$1 seed=$2
    shift 2
    for pool in cls avg; do
        local gp=token; [[ $pool == avg ]] && gp=avg
        run "$arm" "lp_$pool" "$OUT/$arm/lp_$pool/results.json" python -m pipelines.linprobe "$@" global_pool=$gp \
            output_dir="$OUT/$arm/lp_$pool" data.train="$PROBE_TRAIN" data.val="$TEST" "$seed" "${PROBE[@]}" "${COMMON[@]}"
    done
}
for arm in "${ORDER[@]}"; do probe "$arm" "$(seed_of "$arm")" pretrained="$OUT/$arm/pt"; done
for i in 0 1; do probe "${SCRATCH_NAMES[$i]}" seed=0 "${SCRATCH_KW[@]}" model="${SCRATCH_MODELS[$i]}"; done

finetune() {  # finetune ARM SEED ENCODER_ARGS...
    local arm=$1 seed=$2
    shift 2
    run "$arm" ft "$OUT/$arm/ft/results.json" python -m pipelines.finetune "$@" output_dir="$OUT/$arm/ft" \
        data.train="$FT_TRAIN" data.val="$TEST" "$seed" "${FT[@]}" "${COMMON[@]}"
}
for arm in baseline feedforward seed1; do finetune "$arm" "$(seed_of "$arm")" pretrained="$OUT/$arm/pt"; done
for i in 0 1; do finetune "${SCRATCH_NAMES[$i]}" seed=0 "${SCRATCH_KW[@]}" model="${SCRATCH_MODELS[$i]}" layer_decay=1.0; done

python benchmarks/ablation_table.py "$OUT" "$TABLE" --data "$DATA"
