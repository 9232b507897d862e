"""The forward-only worker as a real Ray worker group on CPU (RayResourcePool(use_gpu=False)), vs direct forwards."""

import os

import pytest
import torch
from tensordict import TensorDict

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from transformers import Qwen2ForCausalLM

    from opd_verl.demo.tiny import build_tiny_qwen2, build_tokenizer, tiny_qwen2_config

    root = tmp_path_factory.mktemp("models")
    untied = str(root / "teacher_untied")  # no tied embeddings: ranks other than 0 build it on the meta device
    cfg = tiny_qwen2_config(vocab_size=259, hidden_size=32, num_layers=2)
    cfg.tie_word_embeddings = False
    torch.manual_seed(3)
    Qwen2ForCausalLM(cfg).save_pretrained(untied)
    build_tokenizer(untied)
    return {
        "a": build_tiny_qwen2(str(root / "teacher_a"), hidden_size=32, seed=1),
        "b": build_tiny_qwen2(str(root / "teacher_b"), hidden_size=32, seed=2),
        "untied": untied,
    }


@pytest.fixture(scope="module")
def ray_cpu():
    import ray

    from opd_verl.cpu_port.activate import cpu_environment

    # veRL's CPU platform in the workers (veRL's FSDP2 loading helper asks the platform for the device)
    env = cpu_environment(os.environ.get("VERL_USE_EXTERNAL_MODULES"))
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        ignore_reinit_error=True,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    yield
    ray.shutdown()


def _group(path, prefix, **kw):
    import ray
    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

    from opd_verl.workers.forward_worker import ForwardOnlyWorker, forward_worker_config

    pool = RayResourcePool(process_on_nodes=[1], use_gpu=False, max_colocate_count=1)
    cls = RayClassWithInitArgs(cls=ray.remote(ForwardOnlyWorker), config=forward_worker_config(path, prefix, **kw))
    wg = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=cls, device_name="cpu")
    wg.init_model()
    return wg


def _rollouts(seed=0, bsz=4):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (int(n),), generator=g) for n in torch.randint(2, 6, (bsz,), generator=g)]
    responses = [torch.randint(0, 256, (int(n),), generator=g) for n in torch.randint(2, 9, (bsz,), generator=g)]
    return prompts, responses


def _nested(rows):
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def _direct(path, prompt, response, temperature=1.0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.cat([prompt, response]).unsqueeze(0)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float() / temperature, dim=-1)
    start = prompt.numel() - 1
    return logp[start : start + response.numel()]


def test_worker_group_matches_direct_forward(ray_cpu, model_dirs):
    from opd_verl.objectives.release import topk_margin

    prompts, responses = _rollouts()
    k = 4
    # student top-K ids over prompt + response positions, as the actor's log-prob pass writes them (int32)
    g = torch.Generator().manual_seed(7)
    full_len = [p.numel() + r.numel() for p, r in zip(prompts, responses)]
    topk_cols = [[torch.randint(0, 256, (n,), generator=g, dtype=torch.int32) for n in full_len] for _ in range(k)]
    td = TensorDict(
        {"prompts": _nested(prompts), "responses": _nested(responses)}
        | {f"opd_student_topk_{j}": _nested(topk_cols[j]) for j in range(k)},
        batch_size=[len(prompts)],
    )
    wg = _group(
        model_dirs["a"],
        "opd_teacher",
        chunk_size=3,
        micro_batch_size=3,
        margin="prob",
    )
    out = wg.compute_logprobs(td)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        full = _direct(model_dirs["a"], p, r)
        start = p.numel() - 1
        cand = torch.stack([topk_cols[j][i][start : start + r.numel()] for j in range(k)], dim=-1).long()
        torch.testing.assert_close(
            out["opd_teacher_log_probs"][i], full.gather(-1, r[:, None]).squeeze(-1), atol=1e-5, rtol=0
        )
        cand_lp = full.gather(-1, cand)
        torch.testing.assert_close(
            out["opd_teacher_margins"][i], topk_margin(cand_lp[None], "prob")[0], atol=1e-5, rtol=0
        )
        # the teacher's mass on the student's top-K ids, summed token by token over the full distribution
        mass = [sum(full[t].exp()[c].item() for c in cand[t].tolist()) for t in range(r.numel())]
        torch.testing.assert_close(out["opd_teacher_topk_mass"][i], torch.tensor(mass), atol=1e-5, rtol=0)


def test_routing_two_teachers(ray_cpu, model_dirs):
    from opd_verl.trainer.routing import assign_teachers, routing_values

    prompts, responses = _rollouts(seed=3, bsz=5)
    sources = ["math", "code", "math", "code", "code"]
    routes = ["math", "code"]
    owners = assign_teachers(routing_values("data_source", sources, None), routes)
    assert owners == [0, 1, 0, 1, 1]
    groups = [_group(model_dirs["a"], "opd_teacher"), _group(model_dirs["b"], "opd_teacher")]
    got = [None] * len(prompts)
    for t, wg in enumerate(groups):
        idx = [i for i, o in enumerate(owners) if o == t]
        td = TensorDict(
            {"prompts": _nested([prompts[i] for i in idx]), "responses": _nested([responses[i] for i in idx])},
            batch_size=[len(idx)],
        )
        out = wg.compute_logprobs(td)
        for j, i in enumerate(idx):
            got[i] = out["opd_teacher_log_probs"][j]
    paths = [model_dirs["a"], model_dirs["b"]]
    for i, (p, r) in enumerate(zip(prompts, responses)):
        own = _direct(paths[owners[i]], p, r).gather(-1, r[:, None]).squeeze(-1)
        other = _direct(paths[1 - owners[i]], p, r).gather(-1, r[:, None]).squeeze(-1)
        torch.testing.assert_close(got[i], own, atol=1e-5, rtol=0)
        assert (got[i] - other).abs().max() > 1e-3  # the teachers really differ


def test_sentence_ids_on_worker(ray_cpu, model_dirs):
    from opd_verl.demo.tiny import build_tokenizer
    from opd_verl.objectives.sentences import token_sentence_ids

    tok = build_tokenizer()
    texts = ["One. Two is here. Three!\nFour.", "Just one sentence"]
    responses = [torch.tensor(tok.encode(t, add_special_tokens=False)) for t in texts]
    prompts = [torch.tensor(tok.encode("Q:", add_special_tokens=False))] * 2
    td = TensorDict({"prompts": _nested(prompts), "responses": _nested(responses)}, batch_size=[2])
    wg = _group(model_dirs["a"], "opd_teacher", sentences=True)
    out = wg.compute_logprobs(td)
    for i, r in enumerate(responses):
        assert out["opd_sentence_ids"][i].tolist() == token_sentence_ids(r, tok, True)
    assert out["opd_sentence_ids"][0].max() == 3 and out["opd_sentence_ids"][1].max() == 0


def _ragged(seed):
    """Rows of very different lengths, including an empty and a length-1 response."""
    g = torch.Generator().manual_seed(seed)
    resp_lens = [0, 1, 37, 2, 60, 1, 0, 11, 25, 4]
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (4, 2, 3, 30, 5, 1, 6, 9, 2, 7)]
    responses = [torch.randint(0, 256, (n,), generator=g) for n in resp_lens]
    return prompts, responses


@pytest.mark.parametrize(
    "settings",
    [
        {"use_remove_padding": True, "use_dynamic_bsz": True, "max_token_len": 48},
        {"use_remove_padding": False, "use_dynamic_bsz": False, "micro_batch_size": 2},
    ],
    ids=["packed_token_budget", "padded_rows"],
)
def test_two_rank_fsdp_group_matches_direct_forward(ray_cpu, model_dirs, settings):
    """Two ranks over gloo, the model loaded on rank 0 and broadcast into FSDP2 shards (meta tensors on rank 1),
    each rank scoring its half of ragged rows; packed + token budget and padded rows give the direct log-probs."""
    import ray
    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

    from opd_verl.workers.forward_worker import ForwardOnlyWorker, forward_worker_config

    pool = RayResourcePool(process_on_nodes=[2], use_gpu=False, max_colocate_count=1)
    cls = RayClassWithInitArgs(
        cls=ray.remote(ForwardOnlyWorker),
        config=forward_worker_config(model_dirs["untied"], "opd_teacher", chunk_size=2, **settings),
    )
    wg = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=cls, device_name="cpu")
    landed = wg.init_model()  # what the trainer's start-up line reports
    assert [(i["world_size"], i["sharded"]) for i in landed] == [(2, True)] * 2
    assert all(i["backend"] in ("gloo", "cpu:gloo") for i in landed), landed
    assert wg.offload_params() == [None, None]  # on CPU the parameters already live in host memory: no report
    wg.load_params()
    prompts, responses = _ragged(seed=11)
    td = TensorDict({"prompts": _nested(prompts), "responses": _nested(responses)}, batch_size=[len(prompts)])
    out = wg.compute_logprobs(td)
    assert len(set(wg.pid())) == 2
    for i, (p, r) in enumerate(zip(prompts, responses)):
        assert out["opd_teacher_log_probs"][i].shape == (r.numel(),)
        if not r.numel():
            continue
        full = _direct(model_dirs["untied"], p, r)
        torch.testing.assert_close(
            out["opd_teacher_log_probs"][i], full.gather(-1, r[:, None]).squeeze(-1), atol=1e-5, rtol=0
        )
