"""A simulated LMDeploy 0.18 api_server: same HTTP surface, a timing model instead of a GPU.

Run it with ``turbofleet sim-worker --host H --port P --model NAME`` (flags: ``--help``), or in-process with
``worker.sim.server.build_app(SimConfig(...))`` served by an ``AppRunner(app, handler_cancellation=True)``.

Modules: tokens (the documented toy tokenizer), cache (block prefix cache), engine (batching and timing),
formats (wire formats), serving (generative endpoints), server (app factory, info and admin endpoints),
faults (injected faults, documented there), instant (``--instant``), register (``--proxy``), runner (process).

Admin API (never affected by faults):
  GET /sim/stats      requests {started, completed, cancelled, aborted, fault_dropped, active, running,
                      waiting}, recent_cancelled [{id, stream, tokens_emitted, max_tokens, detected_by,
                      stop_delay_ms, stopped_at_unix}], tokens {prompt, generation}, prefix_cache {lookups,
                      hits, cached_tokens, prompt_tokens, hit_rate, evicted_blocks, enabled, blocks_used,
                      capacity_blocks, block_size, usage}, faults_fired, ttft, kv_usage, slow_factor, faults,
                      engine (the timing configuration)
  GET /sim/faults     {"active": {...} | null, "remaining": N | null}
  POST /sim/faults    set one fault (JSON, see faults.py); DELETE /sim/faults clears it
  DELETE /sim/cache   empty the prefix cache
"""
