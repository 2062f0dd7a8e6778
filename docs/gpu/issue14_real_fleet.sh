#!/bin/bash
# Issue 14 on real TurboMind (successor of issue5_real_fleet.sh). Runs ON THE DEVICE from the repo root, as
# copied into the git-ignored .gpuwork/ (see docs/GPU.md, "Issue 14"). Beside it there:
#   .gpuwork/tf.txz            = this branch's Python tree (balancer bench proxy worker turbofleet), unpacked to
#                                /tmp/tf and put first on PYTHONPATH (python -m turbofleet ...)
#   .gpuwork/gpu.txz           = .gpu (a copy of ../shared/gpu without logs/ and README.md), unpacked to ./.gpu
#   .gpuwork/make_model.py     = ../shared/gpu/make_tiny_model.py with max_position_embeddings 65536
#   .gpuwork/mooncake_head.jsonl.xz = the first 400 lines of ../shared/traces/mooncake_conversation_trace.jsonl
#   (compressed: everything that travels must stay under 64 MiB, and .carry/pt+tm+sg is 64 MB of it)
#   .carry/sg                  = sglang_router's Python files (tgz), its stripped Rust extension (xz), orjson and
#                                setproctitle wheels
# ONE device call (carry .gpuwork .carry/pt .carry/tm .carry/sg):
#   bash .gpuwork/run.sh 2>&1 | tee $OUT/run.txt          (.gpuwork/run.sh = this file)
# Installs LMDeploy+TurboMind and the SGLang gateway, makes a 1.5B random Llama (2 KV heads), starts 4 TurboMind
# api_servers on the one GPU (prefix caching on), measures the engine for the simulator's fit
# (bench/gpu_calibrate.py), then `turbofleet bench compare --fleet-url x4` on the trace, multiround and
# shared-prefix with every router in front of the same 4 servers.
# PARTS may add `sim`: once the servers are stopped, the same multiround (SIM_MULTI times) and, with SIM_TR_ROUTERS,
# the trace on 4 sim workers of SIM_PROFILE, on this machine's CPUs: sim against real in one call, one box.
set -u
T0=$(date +%s); ts() { echo; echo "=== [+$(( $(date +%s) - T0 ))s] $*"; }
W=$PWD/.gpuwork
export SITE=/tmp/site MODEL_DIR=/tmp/model-1b5 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; L=/tmp/tf-logs; R=/tmp/tf-res; mkdir -p $OUT $L $R
PARTS=${PARTS:-calib trace multi shared}
ROUTERS=${ROUTERS:-turbofleet:kv_aware,sglang,lmdeploy,turbofleet:least_queue,turbofleet:round_robin}
# the issue-14 variant (cache room for unmatched prompts, the measured backlog) beside them, where asked
NEW=${NEW:-turbofleet:kv_aware/room_weight=1/backlog=auto}
TR_ROUTERS=${TR_ROUTERS:-$NEW,$ROUTERS}; MR_ROUTERS=${MR_ROUTERS:-$NEW,$ROUTERS}; SP_ROUTERS=${SP_ROUTERS:-$ROUTERS}
CACHE=${CACHE:-0.2}
[ -d .gpu ] || tar -xJf $W/gpu.txz
xz -dc $W/mooncake_head.jsonl.xz > /tmp/mooncake_head.jsonl
[ -f .carry/tm/libcudart.so.12 ] || xz -dc $W/libcudart.so.12.xz > .carry/tm/libcudart.so.12
ts "model"
python3 $W/make_model.py --out $MODEL_DIR --tokenizer-from .gpu/tiny_llama_tokenizer --hidden 2048 --heads 16 \
  --kv-heads 2 --layers 24 --intermediate 8192 > $L/model.txt 2>&1 || { cat $L/model.txt; exit 3; }
ts "install"
. .gpu/device_install.sh turbomind || exit 1
mkdir -p /tmp/tf && tar -xJf $W/tf.txz -C /tmp/tf && export PYTHONPATH=/tmp/tf:$PYTHONPATH PYTHONSAFEPATH=1  # not the checkout's own tree
python3 -c "import turbofleet.balancer.measured, sys; print('turbofleet from', turbofleet.balancer.measured.__file__)"
tar -xzf .carry/sg/sglang_router_py.tgz -C $SITE
xz -dc .carry/sg/sglang_router_rs.abi3.so.xz > $SITE/sglang_router/sglang_router_rs.abi3.so
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE .carry/sg/*.whl
mkdir -p /tmp/bin
printf '#!/bin/sh\nexec python3 -c "import sys; from sglang_router.cli import main; sys.exit(main())" "$@"\n' > /tmp/bin/sglang-router
printf '#!/bin/sh\nexec python3 -m lmdeploy "$@"\n' > /tmp/bin/lmdeploy
chmod +x /tmp/bin/*; export PATH=/tmp/bin:$PATH
python3 -c "import sys, torch, aiohttp, lmdeploy; print(sys.version.split()[0], 'torch', torch.__version__, 'aiohttp', aiohttp.__version__, 'lmdeploy', lmdeploy.__version__)"
sglang-router --help > /dev/null && echo "sglang-router runs"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
SRV="python3 -m lmdeploy serve api_server $MODEL_DIR --backend turbomind --server-name 127.0.0.1 --model-name m1b --cache-max-entry-count $CACHE --session-len 65536 --enable-prefix-caching"
ts "4 servers: $SRV"
FLEET=""
for i in 0 1 2 3; do
  port=$((23333 + i)); FLEET="$FLEET --fleet-url http://127.0.0.1:$port"
  setsid $SRV --server-port $port > $L/server-$port.log 2>&1 < /dev/null &
  echo $! > /tmp/srv-$port.pid
done
for port in 23333 23334 23335 23336; do
  for i in $(seq 1 180); do curl -sf localhost:$port/v1/models > /dev/null && break; sleep 1; done
  curl -sf localhost:$port/v1/models > /dev/null || { echo "server :$port did not start"; tail -n 40 $L/server-$port.log; exit 4; }
done
ts "4 servers ready"
nvidia-smi --query-gpu=memory.used,memory.total --format=csv
grep -h -i "block\|cache\|max_batch\|prefill_token\|session_len" $L/server-23333.log | head -20
# a section's timeout: its own, or what is left of the call's BUDGET (s) less a margin for the copy-out
lim() { local left=$(( ${BUDGET:-580} - ($(date +%s) - T0) - 12 )); [ $left -lt $1 ] && echo $(( left > 5 ? left : 5 )) || echo $1; }
has() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
save() { tar -czf $OUT/results.tgz -C /tmp tf-res; }
if has calib; then
  ts "calibration (one server idle, then all four)"
  timeout $(lim ${CALIB_TO:-120}) python3 -m turbofleet.bench.gpu_calibrate --url http://127.0.0.1:23333 --also http://127.0.0.1:23334 \
    --also http://127.0.0.1:23335 --also http://127.0.0.1:23336 --model m1b --tokenizer .gpu/tiny_llama_tokenizer \
    --out $R/calib.json
  curl -s localhost:23333/metrics | grep -E "^lmdeploy:(gpu_cache_usage_perc|prefix_cache_hit_rate|num_requests)" ; save
fi
export TURBOFLEET_BACKLOG_AUDIT=${AUDIT:-1}  # kv_aware's route reasons carry its backlog estimates (issue 14)
BC="python3 -m turbofleet bench compare"
BO="--quiet $FLEET --model m1b --log-dir $L/bench ${PROXY_ARGS:+--proxy-args} ${PROXY_ARGS:-}"
if has trace; then
  ts "Mooncake conversation trace, first ${TRACE_N:-400} requests"
  timeout $(lim ${TRACE_TO:-260}) $BC trace /tmp/mooncake_head.jsonl $BO --max-requests ${TRACE_N:-400} --time-scale ${TRACE_TS:-0.2} \
    --token-scale ${TRACE_TOK:-0.1} --routers $TR_ROUTERS --json $R/trace.json --requests-out $R/req-trace.jsonl --plot $R/plot-trace
  for port in 23333 23334 23335 23336; do curl -s localhost:$port/metrics | grep -E "^lmdeploy:gpu_cache_usage_perc"; done; save
fi
if has ramp; then  # issue 10 on real TurboMind: offered load in steps of measured capacity, goodput within an SLO
  ts "ramp ${RAMP:-1,1.5,2} x capacity on the trace: ${RAMP_ROUTERS:-turbofleet:kv_aware,lmdeploy}"
  timeout $(lim ${RAMP_TO:-240}) $BC trace /tmp/mooncake_head.jsonl --quiet $FLEET --model m1b --log-dir $L/ramp \
    --max-requests ${RAMP_N:-300} --token-scale ${TRACE_TOK:-0.1} --routers ${RAMP_ROUTERS:-turbofleet:kv_aware,lmdeploy} \
    --ramp ${RAMP:-1,1.5,2} --concurrency 64 --slo-ms ${SLO_MS:-1000} --interactive-share 0.2 --queue-budget 1.5 \
    --json $R/ramp.json --requests-out $R/req-ramp.jsonl --plot $R/plot-ramp
  save
fi
if has trace2; then  # the trace again, other routers or the same in another order (call 2)
  ts "Mooncake conversation trace again: $TR2_ROUTERS"
  timeout $(lim ${TRACE_TO:-260}) $BC trace /tmp/mooncake_head.jsonl $BO --max-requests ${TRACE_N:-400} --time-scale ${TRACE_TS:-0.2} \
    --token-scale ${TRACE_TOK:-0.1} --routers $TR2_ROUTERS --json $R/trace2.json --requests-out $R/req-trace2.jsonl
  save
fi
if has multi; then
  ts "multiround: ${USERS:-24} users x ${ROUNDS:-4} rounds, each opening with its own 2,000-token document, ${USER_RATE:-3} users/s"
  timeout $(lim ${MULTI_TO:-130}) $BC multiround $BO --users ${USERS:-24} --rounds ${ROUNDS:-4} --first-doc-tokens 2000 --answer-tokens 64 \
    --think-time 1 --rate ${USER_RATE:-3} --routers $MR_ROUTERS --json $R/multi.json --requests-out $R/req-multi.jsonl
  save
fi
if has shared; then
  ts "shared-prefix: ${GROUPS_N:-32} groups x 4 prompts, 2,000-token group prompt"
  timeout $(lim ${SHARED_TO:-90}) $BC shared-prefix $BO --groups ${GROUPS_N:-32} --prompts-per-group 4 --system-tokens 2000 \
    --output-tokens 64 --rate ${SP_RATE:-12} --routers $SP_ROUTERS --json $R/shared.json --requests-out $R/req-shared.jsonl
  save
fi
if [ -n "${EXTRA:-}" ]; then ts "extra: $EXTRA"; bash -c "$EXTRA"; save; fi
ts "stop"
for port in 23333 23334 23335 23336; do kill -TERM -- -$(cat /tmp/srv-$port.pid) 2>/dev/null; done
sleep 2
cp $L/server-23333.log $R/ 2>/dev/null
tar -czf $OUT/logs.tgz -C /tmp tf-logs 2>/dev/null
save
if has sim; then  # the calibrated sim on this machine's CPUs, same workloads, once the GPU servers are gone
  SP="--workers 4 --model m1b --quiet --sim-args=--profile=${SIM_PROFILE:-turbomind-h200-1b5-x4gpu-words-curve} --log-dir $L/sim"
  for k in $(seq 1 ${SIM_MULTI:-2}); do
    ts "sim multiround $k: ${SIM_PROFILE:-turbomind-h200-1b5-x4gpu-words-curve}"
    timeout $(lim ${MULTI_TO:-130}) $BC multiround $SP --users ${USERS:-24} --rounds ${ROUNDS:-4} --first-doc-tokens 2000 \
      --answer-tokens 64 --think-time 1 --rate ${USER_RATE:-3} --routers ${SIM_MR_ROUTERS:-turbofleet:kv_aware} \
      --json $R/sim-multi-$k.json --requests-out $R/req-sim-multi-$k.jsonl
  done
  if [ -n "${SIM_TR_ROUTERS:-}" ]; then
    ts "sim trace: $SIM_TR_ROUTERS"
    timeout $(lim ${TRACE_TO:-260}) $BC trace /tmp/mooncake_head.jsonl $SP --max-requests ${TRACE_N:-400} \
      --time-scale ${TRACE_TS:-0.2} --token-scale ${TRACE_TOK:-0.1} --routers $SIM_TR_ROUTERS --json $R/sim-trace.json \
      --requests-out $R/req-sim-trace.jsonl
  fi
  save
fi
ts "done"
