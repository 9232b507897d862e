"""A rollout backend for veRL that serves token-in/token-out generation with plain Hugging Face `generate` on CPU.

veRL 0.9.1 drives rollouts only through server-style replicas (`RolloutReplicaRegistry`): the agent loop calls
`server.generate(prompt_ids, sampling_params, request_id, ...)` on a Ray actor and gets a `TokenOutput`; the trainer
worker pushes new weights through a worker-side adapter (`BaseRollout` subclass from `_ROLLOUT_REGISTRY`); veRL's
distillation teacher loop asks a replica for `prompt_logprobs`. This module provides all three for `rollout.name=hf`:

- `HFRolloutServer`: Ray actor holding an HF causal LM; `generate` samples with `model.generate` and returns the
  sampled tokens' log-probs (of the temperature-scaled distribution, as veRL's trainer computes them); with
  `prompt_logprobs=k` it runs one forward and returns vLLM's prompt-logprob layout (the sampled next token for
  k = 0, the model's top-k otherwise). Sleep, wake-up, KV-cache and abort calls are no-ops.
- `HFRolloutReplica`: starts one server per replica (hybrid: next to the trainer workers; colocated/standalone:
  on its own pool, as veRL's teacher loop does) without asking Ray for an accelerator.
- `HFServerAdapter`: worker-side adapter; `update_weights` gathers the full tensors on every trainer rank and
  rank 0 of the replica loads them into the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import ray
import torch
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, TokenOutput

logger = logging.getLogger(__name__)

ROLLOUT_NAME = "hf"
SERVER_NAME_PREFIX = "opd_hf_server"


def server_actor_name(replica_rank: int, name_suffix: str = "", kind: str = "") -> str:
    """Ray actor name of the server of replica `replica_rank` (`kind`: "", "teacher" or "reward")."""
    middle = f"_{kind}" if kind else ""
    return f"{SERVER_NAME_PREFIX}{middle}_{replica_rank}{name_suffix}"


def _model_path(model_config: Any) -> str:
    for key in ("local_path", "path"):
        value = model_config.get(key) if hasattr(model_config, "get") else getattr(model_config, key, None)
        if value:
            return str(value)
    raise ValueError("opd_verl.cpu_port.hf_rollout: the rollout model config has neither `local_path` nor `path`")


def _cfg_get(config: Any, key: str, default: Any = None) -> Any:
    if hasattr(config, "get"):
        try:
            return config.get(key, default)
        except Exception:  # noqa: BLE001
            pass
    return getattr(config, key, default)


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32):
    """Load an HF causal LM for CPU inference (sdpa attention, eval mode)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    return model


def sample_batch(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    ignore_eos: bool = False,
    generator_seed: int | None = None,
) -> list[tuple[list[int], list[float]]]:
    """Sample one response per prompt in a single left-padded `generate` call; return ids and their log-probs.

    Args:
        model: HF causal LM.
        prompts: B prompts of token ids (lengths P_b).
        max_new_tokens: at most this many response tokens R_b (>= 1); a response ends after its first eos token.
        temperature: sampling temperature; 0 means greedy. Log-probs are of `log_softmax(logits / temperature)`
            (temperature 1 when greedy), the distribution veRL's trainer recomputes.
        top_p, top_k: nucleus / top-k filtering (1.0 / -1 or 0: off).
        eos_token_id: token(s) that end a response (included in it, as vLLM does).
        pad_token_id: padding id (left padding of the prompts).
        ignore_eos: keep sampling until `max_new_tokens`.
        generator_seed: if given, the sampling is reproducible.

    Returns:
        B pairs (response ids `[R_b]`, log-probs `[R_b]`).
    """
    greedy = temperature is None or temperature <= 0
    scale = 1.0 if greedy else float(temperature)
    pad = int(pad_token_id if pad_token_id is not None else 0)
    eos_set = set() if ignore_eos or eos_token_id is None else set(_as_id_list(eos_token_id))
    kwargs: dict[str, Any] = {
        "max_new_tokens": int(max_new_tokens),
        "min_new_tokens": int(max_new_tokens) if ignore_eos else 0,
        "do_sample": not greedy,
        "output_logits": True,
        "return_dict_in_generate": True,
        "pad_token_id": pad,
        "eos_token_id": None if ignore_eos else eos_token_id,
    }
    if not greedy:
        kwargs["temperature"] = scale
        kwargs["top_p"] = float(top_p) if top_p is not None else 1.0
        kwargs["top_k"] = int(top_k) if top_k is not None and top_k > 0 else 0
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, width - len(p) :] = 1
    with torch.random.fork_rng(devices=[], enabled=generator_seed is not None):
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    logits = torch.stack(out.logits, dim=1).float()  # [B, R, V], raw logits of each generated step
    responses = out.sequences[:, width : width + logits.shape[1]]  # [B, R]
    logprobs = torch.log_softmax(logits / scale, dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    results = []
    for ids, lps in zip(responses.tolist(), logprobs.tolist()):
        end = len(ids)
        for t, tok in enumerate(ids):
            if tok in eos_set:
                end = t + 1
                break
        results.append((ids[:end], lps[:end]))
    return results


def _as_id_list(value) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def sample_tokens(model, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> tuple[list[int], list[float]]:
    """`sample_batch` for a single prompt: (response ids `[R]`, log-probs `[R]`)."""
    return sample_batch(model, [prompt_ids], max_new_tokens, **kwargs)[0]


def prompt_logprobs_from_logits(
    logits: torch.Tensor, token_ids: list[int], num_logprobs: int
) -> tuple[list[list[int]], list[list[float]]]:
    """vLLM-layout prompt log-probs from a sequence's logits `[S, V]` (see `prompt_logprobs`)."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # [S-1, V]
    if num_logprobs == 0:
        nxt = torch.tensor(token_ids[1:], dtype=torch.long).unsqueeze(-1)
        out_ids, out_lp = nxt, logp.gather(-1, nxt)
    else:
        out_lp, out_ids = torch.topk(logp, k=int(num_logprobs), dim=-1)
    width = max(int(num_logprobs), 1)
    return out_ids.tolist() + [[0] * width], out_lp.tolist() + [[0.0] * width]


def prompt_logprobs(model, token_ids: list[int], num_logprobs: int) -> tuple[list[list[int]], list[list[float]]]:
    """vLLM-layout prompt log-probs of a sequence (one forward pass).

    Entry i (0 <= i < S-1) is about the next token i+1: with `num_logprobs=0` its id and log-prob, otherwise the
    model's top-k ids and log-probs at position i; entry S-1 is a dummy of zeros (as vLLM's extraction pads it).

    Returns:
        (ids `[S][max(k, 1)]`, log-probs `[S][max(k, 1)]`).
    """
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([token_ids], dtype=torch.long)).logits[0]
    return prompt_logprobs_from_logits(logits, token_ids, num_logprobs)


class HFRolloutServer:
    """Ray actor serving token-in/token-out generation and prompt log-probs with an HF model on CPU."""

    def __init__(self, config, model_config, replica_rank: int = 0, torch_threads: int | None = None):
        from verl.utils.config import omega_conf_to_dataclass

        self.config = omega_conf_to_dataclass(config) if not hasattr(config, "response_length") else config
        self.model_config = model_config
        self.replica_rank = replica_rank
        if torch_threads is None:
            torch_threads = int(os.environ.get("OPD_VERL_ROLLOUT_THREADS", "1"))
        torch.set_num_threads(max(1, torch_threads))
        path = _model_path(model_config)
        self.model = load_causal_lm(path)
        gen_cfg = getattr(self.model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None) or self.model.config.eos_token_id
        self.eos_token_id = eos
        pad = getattr(gen_cfg, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else self.model.config.pad_token_id
        self.global_steps = None
        self.weight_version = 0
        self._lock = asyncio.Lock()
        self._pending: list[tuple[list[int], dict, asyncio.Future]] = []
        self._runner: asyncio.Future | None = None
        self.max_batch = int(os.environ.get("OPD_VERL_ROLLOUT_MAX_BATCH", "64"))
        self.batch_wait_s = 0.005

    # ---- generation -------------------------------------------------------------------------------------------
    def _max_tokens(self, prompt_len: int, sampling_params: dict) -> int:
        response_length = int(_cfg_get(self.config, "response_length", 16))
        prompt_length = int(_cfg_get(self.config, "prompt_length", 64))
        max_model_len = _cfg_get(self.config, "max_model_len", None) or (prompt_length + response_length)
        max_possible = int(max_model_len) - prompt_len
        if max_possible < 1:
            raise ValueError(
                f"Prompt length ({prompt_len}) leaves no room to generate within max_model_len ({max_model_len})"
            )
        if "max_tokens" in sampling_params:
            max_tokens = sampling_params.pop("max_tokens")
        elif "max_new_tokens" in sampling_params:
            max_tokens = sampling_params.pop("max_new_tokens")
        else:
            max_tokens = min(response_length, prompt_length + response_length - prompt_len)
        return max(1, min(int(max_tokens), max_possible))

    @staticmethod
    def _wants_logprobs(sampling_params: dict) -> bool:
        # veRL passes `logprobs` as a bool; an int (vLLM's count of extra top log-probs) also asks for them.
        requested = sampling_params.get("logprobs", False)
        return requested is not None and requested is not False

    def _teacher_sync(self, prompt_ids: list[int], num_prompt_logprobs: int) -> dict:
        """Prompt log-probs of the whole sequence; the one response token is the greedy next token."""
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0].float()  # [S, V]
        out_ids, out_lps = prompt_logprobs_from_logits(logits, prompt_ids, num_prompt_logprobs)
        last = torch.log_softmax(logits[-1], dim=-1)
        token = int(last.argmax())
        return {
            "token_ids": [token],
            "log_probs": [float(last[token])],
            "stop_reason": "completed",
            "extra_fields": {"prompt_ids": out_ids, "prompt_logprobs": out_lps},
        }

    def _generate_batch_sync(self, requests: list[tuple[list[int], dict]]) -> list[dict]:
        """Serve a batch of requests: teacher (prompt log-prob) requests one by one, sampling requests grouped by
        their sampling settings into single `generate` calls."""
        results: list[dict | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        budgets: list[int] = [0] * len(requests)
        for i, (prompt_ids, params) in enumerate(requests):
            params = dict(params)
            num_prompt_logprobs = params.pop("prompt_logprobs", None)
            budgets[i] = self._max_tokens(len(prompt_ids), params)
            if num_prompt_logprobs is not None:
                if budgets[i] != 1:
                    raise ValueError("opd_verl.cpu_port.hf_rollout: prompt_logprobs requests must ask for max_tokens=1")
                results[i] = self._teacher_sync(prompt_ids, int(num_prompt_logprobs))
                continue
            key = (
                float(params.get("temperature", 1.0)),
                float(params.get("top_p", 1.0)),
                int(params.get("top_k", -1) or -1),
                bool(params.get("ignore_eos", False)),
                params.get("seed"),
            )
            groups.setdefault(key, []).append(i)
        for (temperature, top_p, top_k, ignore_eos, seed), idx in groups.items():
            outs = sample_batch(
                self.model,
                [requests[i][0] for i in idx],
                max(budgets[i] for i in idx),
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                ignore_eos=ignore_eos,
                generator_seed=None if seed is None else int(seed),
            )
            for i, (ids, lps) in zip(idx, outs):
                ids, lps = ids[: budgets[i]], lps[: budgets[i]]
                results[i] = {
                    "token_ids": ids,
                    "log_probs": lps if self._wants_logprobs(requests[i][1]) else None,
                    "stop_reason": "completed",
                    "extra_fields": {},
                }
        for r in results:
            r["extra_fields"].update(global_steps=self.global_steps, weight_version=self.weight_version)
        return results

    async def _drain(self):
        """Serve queued requests in batches (requests that arrive together share one `generate`)."""
        while self._pending:
            await asyncio.sleep(self.batch_wait_s)
            async with self._lock:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                try:
                    results = await asyncio.to_thread(self._generate_batch_sync, [(p, s) for p, s, _ in batch])
                except Exception as err:  # noqa: BLE001 - hand the error to every waiting caller
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(err)
                    continue
            for (_, _, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Any = None,
        video_data: Any = None,
        audio_data: Any = None,
        mm_processor_kwargs: Any = None,
        priority: int = 0,
        **kwargs: Any,
    ):
        """veRL's token-in/token-out call; returns a `TokenOutput`."""
        if image_data is not None or video_data is not None or audio_data is not None:
            raise ValueError("opd_verl.cpu_port.hf_rollout serves text-only models")
        future = asyncio.get_running_loop().create_future()
        self._pending.append(([int(t) for t in prompt_ids], dict(sampling_params), future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._drain())
        return TokenOutput(**(await future))

    # ---- weights ----------------------------------------------------------------------------------------------
    async def update_weights(self, state_dict: dict[str, torch.Tensor], global_steps: int | None = None) -> int:
        """Load a (possibly partial) HF-named state dict into the model. Returns the number of tensors loaded."""
        async with self._lock:
            # state_dict keys include tied weights (e.g. lm_head.weight tied to the embeddings).
            params = self.model.state_dict(keep_vars=True)
            loaded = 0
            with torch.no_grad():
                for name, tensor in state_dict.items():
                    target = params.get(name)
                    if target is None:
                        raise KeyError(
                            f"opd_verl.cpu_port.hf_rollout: weight {name!r} does not exist in the rollout model"
                        )
                    target.copy_(tensor.to(dtype=target.dtype).view_as(target))
                    loaded += 1
            self.weight_version += 1
            if global_steps is not None:
                self.global_steps = global_steps
            return loaded

    def get_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    async def set_global_steps(self, global_steps: int):
        self.global_steps = global_steps

    # ---- control calls that have no meaning for an in-process HF model ----------------------------------------
    async def wake_up(self, tags: list[str] | None = None):
        return None

    async def sleep(self):
        return None

    async def clear_kv_cache(self):
        return None

    async def release_kv_cache(self):
        return None

    async def resume_kv_cache(self):
        return None

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False):
        return {}

    async def resume_generation(self):
        return None

    async def start_profile(self, **kwargs):
        return None

    async def stop_profile(self):
        return None

    async def wait_for_requests_to_drain(self):
        async with self._lock:
            return None

    def get_server_address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address().strip("[]"), 0


class HFRolloutReplica(RolloutReplica):
    """One HF server per replica; never asks Ray for an accelerator."""

    def rollout_worker_use_gpu(self) -> bool:
        return False

    def _kind(self) -> str:
        if self.is_teacher_model:
            return "teacher"
        if self.is_reward_model:
            return "reward"
        return ""

    async def init_colocated(self, resource_pool):
        # veRL's teacher loop places a colocated replica on its own pool; the HF server is a single CPU actor,
        # so no per-bundle worker processes are started.
        self.rollout_mode = RolloutMode.COLOCATED
        self.resource_pool = resource_pool
        await self.launch_servers()

    async def init_standalone(self):
        self.rollout_mode = RolloutMode.STANDALONE
        await self.launch_servers()

    async def launch_servers(self):
        name = server_actor_name(self.replica_rank, self.name_suffix, self._kind())
        server = (
            ray.remote(HFRolloutServer)
            .options(name=name, num_cpus=0, num_gpus=0, max_concurrency=self.max_concurrency)
            .remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        )
        address, _ = await server.get_server_address.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"{address}:{name}"


class HFServerAdapter(BaseRollout):
    """Worker-side half of the HF rollout: weight updates from the trainer engine to the server actor."""

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1, **kwargs):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))
        rollout_world_size = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // rollout_world_size if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % rollout_world_size
        self.sleep_level = 1
        self._server = None

    def _server_handle(self):
        if self.rollout_rank != 0:
            return None
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]):
        return None

    async def release(self):
        return None

    async def update_weights(self, weights, wire_format: str = "named_tensors", **kwargs):
        if wire_format != "named_tensors":
            raise ValueError(f"opd_verl.cpu_port.hf_rollout: unsupported weight wire format {wire_format!r}")
        if kwargs.get("peft_config") is not None:
            raise NotImplementedError("opd_verl.cpu_port.hf_rollout: LoRA adapters are not supported on CPU")
        state: dict[str, torch.Tensor] = {}
        if hasattr(weights, "__aiter__"):
            async for name, tensor in weights:
                state[name] = _to_cpu_full(tensor)
        else:
            for name, tensor in weights:
                state[name] = _to_cpu_full(tensor)
        server = self._server_handle()
        if server is not None:
            await server.update_weights.remote(state, global_steps=kwargs.get("global_steps"))


def _to_cpu_full(tensor: torch.Tensor) -> torch.Tensor:
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu").clone()
