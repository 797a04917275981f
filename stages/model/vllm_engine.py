"""The rollout stage's side of the vLLM engine: token-id prompts out, completions and log-probs in.

    rollout stage ──POST /v1/completions (token ids, n = G, seed per prompt)──► vLLM server(s)
                  ◄── token ids, each sampled token's log-prob, finish reason ──
    after update i ─POST /collective_rpc load_checkpoint(runs/checkpoints/i)──► every server

Each prompt is one request with its own seed, derived from (seed, iteration, prompt_id): vLLM
then draws the same tokens whatever else it batches with it, and whichever server (of
`rollout.vllm.urls`) gets it, so the rollouts are a function of the run's params alone. The
servers hold whole prompt groups each. Weights travel as files (prime-rl's transport): the
checkpoint the update writes is reloaded into each server in place (`stages.model.vllm_worker`).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
import xxhash

from stages.errors import EngineError, one_line
from stages.model.generation import Samples, pad_rows

CONNECT_SECONDS = 5.0
REQUEST_SECONDS = 1800.0  # one prompt's G completions; a CPU server under a realistic batch needs minutes
RELOAD_SECONDS = 600.0
MAX_CONCURRENT_REQUESTS = 256
LORA_NAME = "policy-adapter"  # vLLM batches what arrives together; more in flight only queue


def request_seed(seed: int, iteration: int, prompt_id: object) -> int:
    """vLLM's seed for one prompt's request (its n completions use seed, seed + 1, ...): a function of
    the run's seed, the iteration and the prompt alone, so the draws do not depend on the batch."""
    key = xxhash.xxh64_intdigest(str(prompt_id).encode())
    state = np.random.SeedSequence([seed, iteration, 1, key >> 32, key & 0xFFFFFFFF]).generate_state(2)
    return int(state[0]) << 29 | int(state[1]) >> 3  # 61 bits: room for + n - 1 in a signed 64-bit seed


def server_error(response: httpx.Response) -> str:
    """vLLM's own message for a refused request (`{"error": {"message": ...}}`), on one line."""
    try:
        body = response.json()
        message = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("detail")
    except ValueError:
        message = None
    return one_line(message or response.text or response.reason_phrase, 300)


@dataclass
class Server:
    """One vLLM server: its URL, the model name it serves under and its context length."""

    url: str
    model: str = ""
    max_model_len: int | None = None
    log: Path | None = None  # a server the run started: its log, named in errors
    pid: int | None = None  # ... and its process (the leader of its process group)

    def where(self) -> str:
        return f"the vLLM server at {self.url}" + (f" (log: {self.log})" if self.log else "")


@dataclass
class VllmEngine:
    """The servers of `rollout.vllm` and the checkpoint they hold."""

    servers: list[Server]
    adapter: bool = False  # model.lora: the servers keep the reference and load each checkpoint's adapter only
    holds: int | None = None  # the checkpoint the servers' weights are (None: not loaded by this run)
    lora_name: str | None = None  # the adapter requests name (None: the served model itself)
    client: httpx.Client = field(default_factory=lambda: httpx.Client(
        timeout=httpx.Timeout(REQUEST_SECONDS, connect=CONNECT_SECONDS),
        limits=httpx.Limits(max_connections=MAX_CONCURRENT_REQUESTS)))

    def call(self, server: Server, endpoint: str, body: dict | None, silent: str, **options) -> httpx.Response:
        """POST `body` (GET without one) to `server`'s `endpoint`; a server that does not answer is
        one line ending in `silent` (what was going on, what to do)."""
        try:
            if body is None and endpoint.startswith("v1/models"):
                return self.client.get(f"{server.url}/{endpoint}", **options)
            return self.client.post(f"{server.url}/{endpoint}", json=body, **options)
        except httpx.HTTPError as error:
            raise EngineError(f"{server.where()} {silent.format(why=one_line(error) or type(error).__name__)}") \
                from None

    def connect(self) -> VllmEngine:
        """Ask each server what it serves; one that does not answer is one line."""
        for server in self.servers:
            response = self.call(server, "v1/models", None, "does not answer ({why}); start it or remove it from "
                                 "rollout.vllm.urls", timeout=CONNECT_SECONDS)
            if response.status_code != 200:
                raise EngineError(f"rollout.vllm.urls: {server.where()} answered /v1/models with "
                                  f"{response.status_code}: {server_error(response)}")
            served = response.json()["data"][0]
            server.model, server.max_model_len = served["id"], served.get("max_model_len")
        return self

    def close(self) -> None:
        self.client.close()

    # --- weights --------------------------------------------------------------------------

    def load_checkpoint(self, checkpoint: int, path: Path) -> float:
        """Every server's weights from the checkpoint directory `path`, in place; the seconds it took.

        With LoRA only the adapter travels: vLLM loads it (in place, under one name) beside the
        reference it serves; checkpoint 0's fresh adapters add exactly zero (B = 0), so the
        reference itself samples iteration 1."""
        started = time.perf_counter()
        self.holds = self.lora_name = None  # until every server has it: a failure halfway leaves them unknown
        if self.adapter:
            calls = [] if checkpoint == 0 else [("v1/load_lora_adapter", {"lora_name": LORA_NAME, "load_inplace": True,
                                                                          "lora_path": str(Path(path).resolve())})]
        else:
            calls = [("collective_rpc", {"method": "load_checkpoint", "kwargs": {"path": str(Path(path).resolve())}})]
        calls.append(("reset_prefix_cache", None))  # cached prompt blocks hold keys and values of the old weights
        for server in self.servers:
            for endpoint, body in calls:
                response = self.call(server, endpoint, body, f"stopped answering while loading checkpoint {checkpoint} "
                                     f"({{why}}); the same command resumes", timeout=RELOAD_SECONDS)
                if response.status_code == 404:
                    raise EngineError(f"{server.where()} takes no weight reloads (POST /{endpoint}: 404): start "
                                      f"it with `grpo vllm-server` (README, 'Rollouts from vLLM')")
                if response.status_code != 200:
                    raise EngineError(f"{server.where()} could not load checkpoint {checkpoint} from {path}: "
                                      f"{server_error(response)}")
        self.holds = checkpoint
        self.lora_name = LORA_NAME if self.adapter and checkpoint else None
        return time.perf_counter() - started

    # --- sampling -------------------------------------------------------------------------

    def warm_up(self) -> None:
        for server in self.servers:
            # The paths a rollout takes: a seeded draw of n > 1 with log-probs, decoding past the prefill.
            response = self.client.post(f"{server.url}/v1/completions", json={
                "model": server.model, "prompt": [1, 1], "n": 2, "seed": 0, "max_tokens": 4, "min_tokens": 4,
                "logprobs": 0, "return_token_ids": True})
            if response.status_code != 200:
                raise EngineError(f"{server.where()} failed its first request: {server_error(response)}")

    def check_context(self, prompt_ids: list[list[int]], labels: list[str], max_new_tokens: int) -> None:
        """A prompt that cannot fit its completion in a server's context is one line, before any request."""
        for server in self.servers:
            if server.max_model_len is None:
                continue
            for ids, label in zip(prompt_ids, labels):
                if len(ids) + max_new_tokens > server.max_model_len:
                    raise EngineError(f"{label}: {len(ids)} prompt tokens + rollout.max_new_tokens={max_new_tokens} "
                                      f"exceed the context of {server.where()} ({server.max_model_len} tokens, "
                                      f"--max-model-len); lower rollout.max_new_tokens or shorten the prompt")

    def sample(self, prompt_ids: list[list[int]], seeds: list[int], *, group_size: int, max_new_tokens: int,
               eos_ids: list[int], temperature: float, top_p: float, where: str) -> Samples:
        """`group_size` completions per prompt, rows grouped by prompt as `generation.sample` returns them.

        The prompts are cut into contiguous shares, one per server; each prompt is a request of
        n = group_size. The log-probs are vLLM's `processed_logprobs`: the sampled token's under the
        temperature-scaled distribution (after the top-p cut, which the trainer's do not have).
        """
        shares = np.array_split(np.arange(len(prompt_ids)), len(self.servers))
        owner = np.concatenate([np.full(len(rows), number) for number, rows in enumerate(shares)])

        def request(index: int) -> list[dict]:
            server = self.servers[int(owner[index])]
            body = {"model": self.lora_name or server.model, "prompt": prompt_ids[index], "n": group_size,
                    "seed": seeds[index], "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                    "logprobs": 0, "return_token_ids": True, "stop_token_ids": eos_ids}
            response = self.call(server, "v1/completions", body,
                                 f"stopped answering during {where} ({{why}}); the same command resumes")
            if response.status_code != 200:
                raise EngineError(f"{server.where()} refused a prompt of {where}: {server_error(response)}")
            return sorted(response.json()["choices"], key=lambda choice: choice["index"])

        pool = ThreadPoolExecutor(max_workers=min(len(prompt_ids), MAX_CONCURRENT_REQUESTS))
        try:
            choices = [choice for answer in pool.map(request, range(len(prompt_ids))) for choice in answer]
        finally:  # a failed request or a second Ctrl-C: the others are not waited for (the server stops next)
            pool.shutdown(wait=False, cancel_futures=True)
        completions = [choice["token_ids"] for choice in choices]
        logprobs = [choice["logprobs"]["token_logprobs"] for choice in choices]
        lengths = [len(ids) for ids in completions]
        width = max(max(lengths), 1)
        tokens, _ = pad_rows(completions, width, 0)
        return Samples(tokens, pad_rows(logprobs, width, 0.0, dtype=torch.float32)[0],
                       torch.tensor(lengths, dtype=torch.long),
                       torch.tensor([bool(ids) and ids[-1] in eos_ids for ids in completions]))
