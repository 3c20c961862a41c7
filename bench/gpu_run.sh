#!/usr/bin/env bash
# Issue 10's GPU run, one command of at most --budget seconds (default 465), no network needed: the CUDA tests
# (tests marked `device`; tests/nodes in ComfyUI's normal, --lowvram and --novram modes; tests/integration fully
# in normal mode, its shipped-workflow, txt2img and repeated-prompt tests in the other two) and every benchmark
# in bench/ at the settings of the issue's targets.
#
# First, here:  bash bench/prepare_gpu_carry.sh    # fills .gpu/: the ComfyUI tree, the wheels the machine lacks
# Then the device tool's `run`:  command "bash bench/gpu_run.sh $OUT", carry [".gpu"], timeout_s 540
# Rerun some parts only:         bash bench/gpu_run.sh $OUT --only 'bench_(audio|bridge)' --budget 200
# Rehearsal on this CPU:         bash bench/gpu_run.sh /tmp/gpu_rehearsal --device cpu --quick
#
# Order: setup (unpack ComfyUI into $X2I_GPU_WORK, default /tmp/x2i-gpu; pip-install the carried wheels whose
# import fails into a --target folder put on PYTHONPATH, so the machine's site-packages stay as they are);
# the tests until 43% of the budget (on the GPU all parts at once, see below); the eager benchmarks one at a
# time (the GPU to themselves), most important first; the torch.compile variants with what time is left.
# Each part has its own timeout, clipped to its phase's deadline; parts continue after a failure.
# Back in OUT, 4 files, rewritten after every part (a run killed half-way still returns what it did):
#   summary.json     per part: status (pass/fail/timeout/skipped/not-run), exit code, seconds, junit counts and
#                    failed tests; ok: everything that had to run passed
#   benchmarks.json  {part: [the JSON lines that benchmark printed]}
#   env.txt          nvidia-smi, versions, pip list, what was installed from the carry
#   logs.tar.gz      every part's .log, the tests' junit .xml, the benchmarks' stdout (.json)
# Exit code: 0 when every part that had to run passed. --device cpu skips the lowvram/novram parts (ComfyUI
# has no VRAM there); --quick takes the smallest settings, runs tests/nodes/test_devices.py of tests/nodes and
# the integration tests that touch the carried packages, and leaves the torch.compile variants out.
set -uo pipefail
OUT=${1:?usage: bench/gpu_run.sh OUT [--device cuda|cpu] [--quick] [--only REGEX] [--budget S]}; shift
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) && cd "$(dirname "$0")/.." || exit 2
DEVICE=cuda QUICK=false ONLY=. BUDGET=
while [ $# -gt 0 ]; do
  case $1 in
    --device) DEVICE=$2; shift ;; --quick) QUICK=true ;; --only) ONLY=$2; shift ;; --budget) BUDGET=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac; shift
done
if $QUICK; then BUDGET=${BUDGET:-840}; TESTS_S=480; else BUDGET=${BUDGET:-465}; TESTS_S=$((BUDGET * 43 / 100)); fi
START=$(date +%s) PY=${PYTHON:-python3} CARRY=${X2I_GPU_CARRY:-.gpu} WORK=${X2I_GPU_WORK:-/tmp/x2i-gpu}
LOG=$WORK/log
rm -rf "$LOG" "$OUT"/{summary.json,benchmarks.json,env.txt,logs.tar.gz} && mkdir -p "$LOG" "$WORK/tmp" && : >"$LOG/parts.tsv"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
export COMFYUI_PATH=$WORK/comfyui X2I_TEST_CACHE=${X2I_TEST_CACHE:-$WORK/cache} TORCHINDUCTOR_CACHE_DIR=$WORK/inductor
export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}

publish() {  # logs.tar.gz, summary.json, benchmarks.json into OUT, each replaced atomically (lanes call it at once)
  tar -czf "$OUT/logs.tar.gz.$BASHPID" -C "$LOG" . 2>/dev/null; mv -f "$OUT/logs.tar.gz.$BASHPID" "$OUT/logs.tar.gz"
  "$PY" - "$LOG" "$OUT" "$DEVICE" "$QUICK" "$BUDGET" "$START" "$@" <<'EOF'
import glob, json, os, sys, time, xml.etree.ElementTree as ET
log, out, device, quick, budget, start = sys.argv[1:7]
final, parts, benches = sys.argv[7:] == ["final"], [], {}
for line in open(os.path.join(log, "parts.tsv")):
    name, status, rc, t0, t1, limit, note = line.rstrip("\n").split("\t")
    part = {"name": name, "status": status, "rc": int(rc), "seconds": round(float(t1) - float(t0), 1), "timeout_s": int(limit)}
    part.update({"note": note} if note else {})
    try:
        suite = ET.parse(os.path.join(log, name + ".xml")).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        part["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        part["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                          if c.find("failure") is not None or c.find("error") is not None][:50]
    except (OSError, ET.ParseError):
        pass
    parts.append(part)
for path in sorted(glob.glob(os.path.join(log, "bench_*.json"))):
    benches[os.path.basename(path)[:-5]] = rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except ValueError:  # a benchmark's tables and other prose
            pass
ok = all(p["status"] in ("pass", "skipped") for p in parts)
summary = {"device": device, "quick": quick == "true", "budget_s": int(budget), "elapsed_s": round(time.time() - int(start)),
           "finished": final, "ok": ok, "parts": parts}
for name, obj in (("summary.json", summary), ("benchmarks.json", benches)):
    with open(os.path.join(out, f"{name}.{os.getpid()}"), "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(os.path.join(out, f"{name}.{os.getpid()}"), os.path.join(out, name))
if final:  # the reply's output tail: numbers first, the parts table last
    for name, rows in benches.items():
        print(name, *[json.dumps(r, separators=(",", ":")) for r in rows], sep="\n  ")
    for p in parts:
        t = p.get("tests")
        counts = f"{t['tests']} tests, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped" if t else ""
        print(f"{p['name']:32} {p['status']:8} {p['seconds']:6.1f} s  {counts} {p.get('note', '')}")
    print(f"ok={ok}  elapsed {summary['elapsed_s']} s of {budget}")
    sys.exit(0 if ok else 1)
EOF
}
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$LOG/parts.tsv"; publish; }  # name status rc t0 t1 limit note

sd15_current() {  # the cached integration checkpoint has the current recipe (tests/integration/conftest.py's rule)
  "$PY" -c 'import json, sys; sys.path.insert(0, "tests/support"); import sd15_checkpoint as c
try:
    f = open(sys.argv[1], "rb"); meta = json.loads(f.read(int.from_bytes(f.read(8), "little"))).get("__metadata__") or {}
except (OSError, ValueError):
    sys.exit(1)
sys.exit(meta.get(c.RECIPE_METADATA_KEY) != c.RECIPE_VERSION)' "$X2I_TEST_CACHE/sd15_random.safetensors"
}

spec() {  # spec NAME: T / Q = timeout (s) on the GPU / with --quick (0: not run), CMD, QX = extra args with --quick
  local d=(--device "$DEVICE") m=${1##*_} b=bench
  local pyt=("$PY" -m pytest -p no:cacheprovider -v --durations=15 -o junit_family=xunit1)
  "$PY" -c "import pytest_timeout" 2>/dev/null && pyt+=(--timeout "$($QUICK && echo 400 || echo 150)")
  QX=() NOTE=
  case $1 in
    tests_device)        T=170 Q=420; CMD=("${pyt[@]}" -m device "${d[@]}" --ignore tests/nodes --ignore tests/integration) ;;
    tests_comfy_vram_short) T=90 Q=0; CMD=("${pyt[@]}" tests/nodes/test_devices.py "${d[@]}" -k "$SHORT") ;;
    tests_comfy_*)       T=170 Q=420; CMD=("${pyt[@]}" tests/nodes "${d[@]}" --comfy-vram "$m")
                         [ "$DEVICE" = cuda ] && [ "$m" = normal ] && CMD+=(-k "not $SHORT")
                         QX=(-k test_devices) ;;  # --quick: the device-switch tests only (CI runs the rest on CPU)
    sd15_checkpoint)     T=150 Q=300; CMD=("$PY" tests/support/sd15_checkpoint.py --comfyui "$COMFYUI_PATH"
                                           --out "$X2I_TEST_CACHE/sd15_random.safetensors")
                         sd15_current && CMD=(true) NOTE="cached in $X2I_TEST_CACHE" ;;
    tests_integration_normal) T=240 Q=420; CMD=("${pyt[@]}" tests/integration "${d[@]}" --comfy-vram normal)
                         QX=(-k "comfy_smoke or multimodal or gluegen_workflows or ui_workflow") ;;  # --quick: what the carry
                         # touches (server start, av, trimesh, py3langid); the SD1.5 sampling of the rest takes minutes on a CPU
    tests_integration_*) T=200 Q=420; CMD=("${pyt[@]}" tests/integration "${d[@]}" --comfy-vram "$m"
                                           -k "shipped or txt2img or repeated_prompts") ;;
    bench_uvit_flops)    T=60 Q=60;   CMD=("$PY" $b/uvit_flops.py --json) ;;
    bench_lavibridge_sampling) T=180 Q=240; CMD=("$PY" $b/lavibridge_sampling.py "${d[@]}" --size 512 --steps 20 --repeats 4)
                         QX=(--small --size 64 --steps 3 --repeats 1 --encode-repeats 2) ;;
    bench_conditioning_latency) T=120 Q=180; CMD=("$PY" $b/conditioning_latency.py "${d[@]}"); QX=(--warmup 1 --repeats 2) ;;
    bench_audio_encode)  T=90 Q=120;  CMD=("$PY" $b/audio_encode.py "${d[@]}" --batch 16); QX=(--batch 2 --warmup 0 --repeats 1) ;;
    bench_pointcloud_encode*) local v=ulip1; [[ $1 == *_ulip2 ]] && v=ulip2_colored
                         T=90 Q=120;  CMD=("$PY" $b/pointcloud_encode.py "${d[@]}" --variant $v --batch 16)
                         QX=(--dtypes fp32 --points 2048 --batch 2 --warmup 0 --repeats 1) ;;
    bench_gluenet_training) T=90 Q=120; CMD=("$PY" $b/gluenet_training.py "${d[@]}" --batch 256 1024); QX=(--batch 4 --warmup 1 --steps 2) ;;
    bench_uvit_training) T=150 Q=180; CMD=("$PY" $b/uvit_training.py "${d[@]}" --batch 256); QX=(--small --batch 4 --steps 2 --warmup 1) ;;
    bench_bridge_training) T=180 Q=180; CMD=("$PY" $b/bridge_training.py "${d[@]}" --batch 8 --resolution 512)
                         QX=(--small --batch 2 --resolution 64) ;;
    bench_bridge_training_sdxl) T=240 Q=180; CMD=("$PY" $b/bridge_training.py "${d[@]}" --sdxl --batch 4 --resolution 1024)
                         QX=(--small --batch 2 --resolution 64) ;;
    bench_conditioning_latency_sdxl) T=150 Q=180; CMD=("$PY" $b/conditioning_latency.py "${d[@]}" --sdxl); QX=(--warmup 1 --repeats 2) ;;
    bench_audio_encode_compile)     T=180 Q=0; CMD=("$PY" $b/audio_encode.py "${d[@]}" --batch 16 --compile) ;;
    bench_gluenet_training_compile) T=150 Q=0; CMD=("$PY" $b/gluenet_training.py "${d[@]}" --batch 256 1024 --compile) ;;
    bench_uvit_training_compile)    T=300 Q=0; CMD=("$PY" $b/uvit_training.py "${d[@]}" --batch 256 --only-compile) ;;
    *) echo "no part $1" >&2; exit 2 ;;
  esac
  $QUICK && [[ $1 == *_compile ]] && NOTE="--quick leaves torch.compile out (minutes on a CPU)"
  if [ "$DEVICE" = cpu ] && [[ $1 == *_lowvram || $1 == *_novram ]]; then
    T=0 Q=0 NOTE="--comfy-vram $m needs --device cuda (tests/conftest.py refuses it on the CPU)"
  fi
}

part() {  # part DEADLINE NAME: run NAME under its timeout, clipped to DEADLINE (epoch s), and record it
  local deadline=$1 name=$2 limit t0 rc status
  [[ $name =~ $ONLY ]] || return 0
  spec "$name"; limit=$($QUICK && echo "$Q" || echo "$T"); $QUICK && CMD+=("${QX[@]}")
  t0=$(date +%s.%N)
  [ "$limit" = 0 ] && { record "$name" skipped 0 "$t0" "$t0" 0 "$NOTE"; return; }
  [ $((deadline - $(date +%s))) -lt "$limit" ] && limit=$((deadline - $(date +%s)))
  [ "$limit" -lt 20 ] && { record "$name" not-run 0 "$t0" "$t0" 0 "out of time"; return; }
  echo "[$(date +%T)] $name (timeout ${limit}s): ${CMD[*]}"
  if [[ $name == bench_* ]]; then
    timeout -k 20 "$limit" "${CMD[@]}" >"$LOG/$name.json" 2>"$LOG/$name.log"
  else
    [[ $name == tests_* ]] && CMD+=(--junitxml "$LOG/$name.xml" --basetemp "$WORK/tmp/$name")
    timeout -k 20 "$limit" "${CMD[@]}" >"$LOG/$name.log" 2>&1
  fi
  rc=$?
  case $rc in 0) status=pass ;; 124) status=timeout ;; *) status=fail ;; esac
  if [ $rc -gt 128 ]; then  # 137: killed after the timeout's grace, or by the kernel (out of memory) before it
    if [ $(( $(date +%s) - ${t0%.*} )) -ge "$limit" ]; then status=timeout; else NOTE="killed by signal $((rc - 128))"; fi
  fi
  echo "[$(date +%T)] $name: $status (rc $rc)"
  [[ $name == *_compile && $status != pass ]] && rm -rf "$TORCHINDUCTOR_CACHE_DIR"  # a killed compile leaves torn files
  record "$name" "$status" "$rc" "$t0" "$(date +%s.%N)" "$limit" "$NOTE"
}
lane() { local deadline=$1; shift; for name in "$@"; do part "$deadline" "$name"; done; }

# --- environment and setup --------------------------------------------------------------------------------
setup() {
  [ -f "$COMFYUI_PATH/main.py" ] || "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
                                          "$CARRY/comfyui.tar.xz" "$WORK" || return 1
  local check='import importlib, sys
for line in open(sys.argv[1]):
    if line.strip() and not line.startswith("#"):
        mod, path = line.split()[:2]
        try:
            importlib.import_module(mod)
        except Exception as e:
            print(path); print(f"missing {mod}: {e!r}", file=sys.stderr)'
  local missing wheels=() path
  mapfile -t missing < <("$PY" -c "$check" "$CARRY/manifest.txt")
  echo "installing from $CARRY: ${missing[*]:-nothing}"
  mkdir -p "$WORK/site"
  for path in "${missing[@]}"; do
    if [[ $path == *.whl ]]; then wheels+=("$CARRY/$path"); else cp -r "$CARRY/$path" "$WORK/site/" || return 1; fi
  done
  if [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$WORK/site" "${wheels[@]}" || return 1
  fi
  mapfile -t missing < <("$PY" -c "$check" "$CARRY/manifest.txt")
  [ ${#missing[@]} -eq 0 ] || { echo "still missing after the install: ${missing[*]}"; return 1; }
}
t0=$(date +%s.%N)
{
  date -u; uname -a; echo "cpus $(nproc)"; free -g; df -h /tmp; nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  "$PY" -c "import sys, torch, transformers, tokenizers; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None); print('transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)"
  gcc --version | head -1; "$PY" -m pip list --format=freeze
} >"$LOG/env.txt" 2>&1
setup >"$LOG/setup.log" 2>&1; rc=$?
cat "$LOG/setup.log" >>"$LOG/env.txt"; cp "$LOG/env.txt" "$OUT/env.txt"
record setup "$([ $rc = 0 ] && echo pass || echo fail)" "$rc" "$t0" "$(date +%s.%N)" 0 ""

# --- tests: on the GPU every part in its own process at once (ComfyUI takes its memory mode once per process;
# 16 cores, 128 GiB), a share of the cores each, then, alone on the GPU, the one test that takes nearly all of
# its free memory (it would starve the others); on a CPU one at a time (few cores, up to 10 GiB a process)
TESTS_END=$((START + TESTS_S)) END=$((START + BUDGET - 15)) lanes=() SHORT=vram_is_short
if [ "$DEVICE" = cuda ]; then
  export OMP_NUM_THREADS=$(( $(nproc) >= 8 ? $(nproc) / 4 : 1 ))
  for name in tests_device tests_comfy_{normal,lowvram,novram}; do lane $TESTS_END $name & lanes+=($!); done
  OMP_NUM_THREADS=$(nproc) lane $TESTS_END sd15_checkpoint bench_uvit_flops  # the integration tests need the checkpoint
  for m in normal lowvram novram; do lane $TESTS_END tests_integration_$m & lanes+=($!); done
  wait "${lanes[@]}"
  unset OMP_NUM_THREADS
  lane $END tests_comfy_vram_short
else
  lane $TESTS_END tests_device tests_comfy_{normal,lowvram,novram} sd15_checkpoint bench_uvit_flops tests_integration_{normal,lowvram,novram}
fi
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv >"$LOG/gpu_after_tests.txt" 2>&1

# --- benchmarks: one at a time, most important first; the torch.compile variants last ----------------------
lane $END bench_lavibridge_sampling bench_conditioning_latency bench_audio_encode bench_pointcloud_encode \
  bench_gluenet_training bench_uvit_training bench_bridge_training bench_bridge_training_sdxl bench_conditioning_latency_sdxl \
  bench_pointcloud_encode_ulip2 \
  bench_audio_encode_compile bench_gluenet_training_compile bench_uvit_training_compile
publish final
