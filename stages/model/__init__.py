"""The model and its engines: what the trainer and the rollout workers run.

`modeling` loads and saves Hugging Face directories (and builds the tiny model); `logprobs`
reads log-probs through the LM head in chunks; `generation` is the native decode loop and
`batching` its batches; `adapters` LoRA (peft); `checkpoints` optimizer state; `distributed`
the torch.distributed trainer group; `memory` names the knob when an allocation fails; the
vLLM engine is `vllm_engine` (requests, weight reloads), `vllm_server` (starting a server) and
`vllm_worker` (runs inside vLLM's own environment: it imports nothing of ours but itself).

Add an engine here. May import `stages.config`, `stages.errors` and `stages.records`; never a
stage or `stages.rewards`.
"""
