#!/usr/bin/env bash
# One prepared run for a lent GPU: tokenizer throughput, the stage-1 training step, and (when the
# generator's benchmark exists) generator training tokens/s, printed as one compact table.
#
#   bash benchmarks/gpu.sh                # on the GPU machine (a few minutes on an H200)
#   bash benchmarks/gpu.sh --cpu-smoke    # the same pieces with tiny sizes on CPU (~2 min on 2 cores)
#   bash benchmarks/gpu.sh --dry          # the plumbing only: fp32, the tiniest sizes, seconds (the tests run it)
#   QLIP_BENCH_PARTS=tok,train bash benchmarks/gpu.sh   # some pieces only (tok, train, gen): a lost machine
#                                                       # returns nothing, so one device call per piece is safer
#
# What it runs (every piece is an ordinary benchmark script with options; see docs/performance.md):
#   1. benchmarks/throughput.py   tokenizer images/s, qlip-b-16-256 and qlip-l-14-392 (random init),
#                                 fp32 and bf16 (cast-once), batch 64: the model alone on pre-decoded
#                                 batches and end to end from JPEG files with decoding workers
#   2. benchmarks/train_step.py   stage-1 step of qlip-b-16-256, bf16, batch 64, images/s and MFU,
#                                 without and with gradient checkpointing
#   3. benchmarks/gen_step.py     generator training tokens/s and sampling images/s (GPT-B, GPT-XL, batch 32,
#                                 bf16), then (GPU only) the training step again with torch.compile'd
#                                 blocks (capped at 200 s) and GPT-B at batch 128
# Raw results are kept as JSON in $QLIP_BENCH_OUT (default: a new temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
case "${1:-}" in
  --cpu-smoke) mode=cpu ;;
  --dry) mode=dry ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu.sh [--cpu-smoke | --dry]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python}
out=${QLIP_BENCH_OUT:-$(mktemp -d)}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import qlip" 2>/dev/null; then
  "$PY" -m pip install -q -e ".[all]"
fi

if [[ $mode == gpu ]]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible (use --cpu-smoke on CPU)')"
  device=cuda
  presets="qlip-b-16-256 qlip-l-14-392"
  workers=$(( $(nproc) > 4 ? $(nproc) - 4 : 2 )); workers=$(( workers > 12 ? 12 : workers ))
  tok_args=(--images 256 --batch-size 64 --rounds 2 --workers "$workers")
  train_args=(--presets qlip-b-16-256 --batch-large 64 --steps 5 --warmup 2)
  gen_args=(--device cuda)
  precisions="bf16"
elif [[ $mode == dry ]]; then
  # every piece once with the smallest sizes, fp32 (bf16 matmuls are a slow path on CPUs without
  # AMX / AVX-512 bf16): checks that the script and the JSON it summarises fit together
  device=cpu
  presets="qlip-tiny"
  precisions="fp32"
  tok_args=(--images 4 --batch-size 2 --rounds 1 --workers 1)
  train_args=(--presets qlip-tiny --batch-tiny 2 --steps 1 --warmup 0 --peak-tflops 1)
  gen_args=(--device cpu --smoke)
else
  device=cpu
  presets="qlip-tiny"
  tok_args=(--images 8 --batch-size 4 --rounds 1 --workers 2)
  train_args=(--presets qlip-tiny --batch-tiny 4 --steps 1 --warmup 1 --peak-tflops 1)
  gen_args=(--device cpu --smoke)
  precisions="bf16"
fi

t0=$(date +%s)
echo "== qlip GPU benchmarks ($mode), results in $out"
"$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

parts=",${QLIP_BENCH_PARTS:-tok,train,gen},"   # e.g. QLIP_BENCH_PARTS=gen: one piece per device call
for preset in $presets; do
  [[ $parts == *,tok,* ]] || break
  "$PY" benchmarks/throughput.py --device "$device" --preset "$preset" --precisions fp32 ${precisions/fp32/} \
    "${tok_args[@]}" --json "$out/tokenize-$preset.json"
done

if [[ $parts == *,train,* ]]; then
  "$PY" benchmarks/train_step.py --device "$device" --precisions "$precisions" --grad-checkpointing both --no-max-batch \
    "${train_args[@]}" --json "$out/train-step.json"
fi

gen_status="skipped: no qlip.gen package"
if [[ $parts != *,gen,* ]]; then
  gen_status="skipped: not in QLIP_BENCH_PARTS"
elif "$PY" -c "import qlip.gen" 2>/dev/null; then
  if [[ -f benchmarks/gen_step.py ]]; then
    "$PY" benchmarks/gen_step.py "${gen_args[@]}" --json "$out/gen-step.json"
    gen_status=ran
    if [[ $mode == gpu ]]; then
      # the same training step with every decoder block torch.compile'd (train.compile), capped so that
      # a slow compile cannot eat the lease; GPT-B again at batch 128 (batch 32 is small for 111M)
      timeout 200 "$PY" benchmarks/gen_step.py "${gen_args[@]}" --compile --no-sample \
        --json "$out/gen-step-compiled.json" || echo "compiled generator step: failed or timed out (exit $?)"
      "$PY" benchmarks/gen_step.py "${gen_args[@]}" --presets gpt-b --batch 128 --no-sample \
        --json "$out/gen-step-b128.json" || echo "gpt-b batch 128: failed (exit $?)"
    fi
  else
    gen_status="skipped: qlip.gen exists but benchmarks/gen_step.py does not"
  fi
fi

"$PY" - "$out" "$gen_status" <<'EOF'
import glob, json, os, sys
out, gen_status = sys.argv[1], sys.argv[2]
print("\n== summary")
print(f"{'what':<44}{'value':>14}  notes")
for path in sorted(glob.glob(os.path.join(out, "tokenize-*.json"))):
    r = json.load(open(path))
    w = r["workers"]
    for row in r["rows"]:
        name = f"tokenize {r['preset']} {row['precision']} b{r['batch_size']}"
        e2e = row.get(f"e2e w{w}", {})
        print(f"{name + ' model img/s':<44}{row['model']['img_per_s']:>14.1f}")
        if e2e:
            print(f"{name + f' e2e w{w} img/s':<44}{e2e['img_per_s']:>14.1f}  {e2e['of_model'] * 100:.0f}% of model")
train = os.path.join(out, "train-step.json")
for r in json.load(open(train))["throughput"] if os.path.isfile(train) else []:
    name = f"train {r['preset']} {r['precision']} b{r['batch']} ckpt {'on' if r.get('ckpt') else 'off'}"
    if "error" in r:
        print(f"{name:<44}{'failed':>14}  {r['error']}")
        continue
    mfu = f"MFU {r['mfu'] * 100:.1f}%" if "mfu" in r else "MFU: peak unknown"
    print(f"{name + ' img/s':<44}{r['img_per_s']:>14.1f}  {mfu}, step memory {r['step_mem_mb']:.0f} MB")
gens = sorted(glob.glob(os.path.join(out, "gen-step*.json")))
for gen in gens:
    g = json.load(open(gen))
    for r in g["rows"]:
        name = (f"generator train tokens/s {r['preset']} {r['precision']} b{r['batch']}"
                + (" compiled" if r.get("compile") else ""))
        if "error" in r:
            print(f"{name:<44}{'failed':>14}  {r['error']}")
            continue
        mfu = f"MFU {r['mfu'] * 100:.1f}%" if "mfu" in r else "MFU: peak unknown"
        print(f"{name:<44}{r['tokens_per_s']:>14.0f}  {mfu}, {r['seq_len']} positions, step {r['step_s']:.3f} s")
        if "images_per_s" in r:
            sname = f"generator sample {r['preset']} b{r['sample_batch']} img/s"
            print(f"{sname:<44}{r['images_per_s']:>14.2f}  cfg {r['cfg']}, KV cache, {r['image_tokens']} tokens/image")
if not gens:
    print(f"{'generator train tokens/s':<44}{'-':>14}  {gen_status}")
EOF
echo "total $(( $(date +%s) - t0 )) s"
