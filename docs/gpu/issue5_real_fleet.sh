#!/bin/bash
# Kept here as it ran from the git-ignored .gpu5/ (see docs/GPU.md, "Issue 5 on real TurboMind"). Beside it there:
#   .gpu5/make_model.py       = ../shared/gpu/make_tiny_model.py with max_position_embeddings/model_max_length 65536
#   .gpu5/mooncake_head.jsonl = the first 700 lines of ../shared/traces/mooncake_conversation_trace.jsonl
#   .carry/sg    = sglang_router's Python files (tgz), its stripped Rust extension (xz), orjson + setproctitle wheels
#   .carry/redis = Debian's redis-server, liblzf.so.1, libjemalloc.so.2 and the redis wheel
# Calls: KVH=2 CACHE=0.15 PARTS="doc doc2 docp trace" TRACE_TOK=0.1 TRACE_TS=0.3 TRACE_TO=190 bash .gpu5/run.sh
#        KVH=2 CACHE=0.15 PARTS="docp sys" bash .gpu5/run.sh      (and the others in docs/bench/gpu/callN-run.txt)
# ONE device call (carry .gpu .gpu5 .carry/pt .carry/tm .carry/sg):
#   bash .gpu5/run.sh 2>&1 | tee $OUT/run.txt
# Installs LMDeploy+TurboMind and the SGLang gateway, makes a ~1.5B random Llama, starts 4 TurboMind api_servers
# on the one GPU (prefix caching on), then `turbofleet bench compare --fleet-url x4` for issue 5's workloads with
# turbofleet:kv_aware, LMDeploy's proxy, SGLang's gateway and ideal pinning in front of the same 4 servers.
set -u
T0=$(date +%s); ts() { echo; echo "=== [+$(( $(date +%s) - T0 ))s] $*"; }
export SITE=$PWD/.site MODEL_DIR=$PWD/.model-kv${KVH:-8} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; L=/tmp/tf-logs; mkdir -p $OUT $L
PARTS=${PARTS:-doc sys trace}
if [ "${DRY:-0}" = 1 ]; then  # rehearsal on a CPU box: 4 sim workers instead of TurboMind
  export PYTHONPATH=$PWD
  SRV="python3 -m turbofleet sim-worker --host 127.0.0.1 --model m1b --speed 0.2"; PF=--port
else
  ts "model"
  [ -f $MODEL_DIR/model.safetensors ] || python3 .gpu5/make_model.py --out $MODEL_DIR \
    --tokenizer-from .gpu/tiny_llama_tokenizer --hidden 2048 --heads 16 --kv-heads ${KVH:-8} --layers 24 --intermediate 8192 || exit 3
  ts "install"
  . .gpu/device_install.sh turbomind || exit 1
  export PYTHONPATH=$PWD:$PYTHONPATH
  if [ -d .carry/sg ]; then
    tar -xzf .carry/sg/sglang_router_py.tgz -C $SITE
    xz -dc .carry/sg/sglang_router_rs.abi3.so.xz > $SITE/sglang_router/sglang_router_rs.abi3.so
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE .carry/sg/*.whl
  fi
  if [ -d .carry/redis ]; then  # Debian's redis-server and the two libraries the image lacks
    export PATH=$PWD/.carry/redis:$PATH LD_LIBRARY_PATH=$PWD/.carry/redis${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    redis-server --version
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE .carry/redis/*.whl
  fi
  mkdir -p /tmp/bin
  printf '#!/bin/sh\nexec python3 -c "import sys; from sglang_router.cli import main; sys.exit(main())" "$@"\n' > /tmp/bin/sglang-router
  printf '#!/bin/sh\nexec python3 -m lmdeploy "$@"\n' > /tmp/bin/lmdeploy
  chmod +x /tmp/bin/*; export PATH=/tmp/bin:$PATH
  python3 -c "import sys, torch, aiohttp, lmdeploy; print(sys.version.split()[0], 'torch', torch.__version__, 'aiohttp', aiohttp.__version__, 'lmdeploy', lmdeploy.__version__)"
  [ -d .carry/sg ] && sglang-router --help > /dev/null && echo "sglang-router runs"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
  SRV="python3 -m lmdeploy serve api_server $MODEL_DIR --backend turbomind --server-name 127.0.0.1 --model-name m1b --cache-max-entry-count ${CACHE:-0.12} --session-len 32768 --enable-prefix-caching"
  PF=--server-port
fi
ts "4 servers: $SRV"
FLEET=""
for i in 0 1 2 3; do
  port=$((23333 + i)); FLEET="$FLEET --fleet-url http://127.0.0.1:$port"
  setsid $SRV $PF $port > $L/server-$port.log 2>&1 < /dev/null &
  echo $! > /tmp/srv-$port.pid
done
for port in 23333 23334 23335 23336; do
  for i in $(seq 1 180); do curl -sf localhost:$port/v1/models > /dev/null && break; sleep 1; done
  curl -sf localhost:$port/v1/models > /dev/null || { echo "server :$port did not start"; tail -n 40 $L/server-$port.log; exit 4; }
done
ts "4 servers ready"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=memory.used,memory.total --format=csv
grep -h -i "block\|cache" $L/server-23333.log | tail -3
has() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
BC="python3 -m turbofleet bench compare"
BO="--quiet $FLEET --model m1b --log-dir $L/bench"
ROUTERS=${ROUTERS:-turbofleet:kv_aware,lmdeploy,sglang,ideal}
if has doc; then
  ts "W1: 32 sessions x 6 rounds, each opening with its own long document"
  timeout 200 $BC multiround $BO --users 32 --rounds 6 --first-doc-tokens 2000 --answer-tokens 64 --think-time 1 \
    --routers $ROUTERS --json $OUT/gpu-doc.json --requests-out $OUT/req-doc.jsonl
fi
if has doc2; then
  ts "W1 again, the routers in the reverse order"
  timeout 120 $BC multiround $BO --users 32 --rounds 6 --first-doc-tokens 2000 --answer-tokens 64 --think-time 1 \
    --routers lmdeploy,turbofleet:kv_aware --json $OUT/gpu-doc2.json
fi
if has docp; then
  ts "W1 with the 32 users arriving as a Poisson stream (${USER_RATE:-2} users/s)"
  timeout 200 $BC multiround $BO --users 32 --rounds 6 --first-doc-tokens 2000 --answer-tokens 64 --think-time 1 \
    --rate ${USER_RATE:-2} --routers $ROUTERS --json $OUT/gpu-docp.json --requests-out $OUT/req-docp.jsonl
fi
if has sys; then
  ts "W2: 32 sessions x 6 rounds, one long system prompt shared by all"
  timeout 120 $BC multiround $BO --users 32 --rounds 6 --first-doc-tokens 0 --system-tokens 2000 --answer-tokens 64 \
    --think-time 1 --routers $ROUTERS --json $OUT/gpu-sys.json
fi
if has trace; then
  ts "W3: Mooncake conversation trace (first ${TRACE_N:-400} requests)"
  timeout ${TRACE_TO:-260} $BC trace .gpu5/mooncake_head.jsonl $BO --max-requests ${TRACE_N:-400} --time-scale ${TRACE_TS:-0.4} \
    --token-scale ${TRACE_TOK:-0.125} --routers $ROUTERS --json $OUT/gpu-trace.json
fi
ts "stop"
for port in 23333 23334 23335 23336; do kill -TERM -- -$(cat /tmp/srv-$port.pid) 2>/dev/null; done
sleep 2
tar -czf $OUT/logs.tgz -C /tmp tf-logs 2>/dev/null
ts "done"
