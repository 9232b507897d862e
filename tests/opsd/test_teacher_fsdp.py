"""OPSD teacher weights on a 2-rank FSDP2 model (gloo): the teacher forward uses the teacher's values for every
parameter, including those FSDP2 keeps unsharded after the student's forward (the root module's: tied embeddings /
lm_head and final norm, under torch's default for the root; all of them with reshard_after_forward=false), and the
student's backward afterwards uses the student's values."""

import copy
import os
import socket
import subprocess
import sys

import torch

WORLD = 2
IDS = [[5, 17, 42, 9, 3, 77, 120, 64], [8, 8, 31, 200, 14, 6, 2, 90]]
# (reshard_after_forward given to fully_shard, teacher mode); None = torch's default (the root stays unsharded)
CASES = [(None, "frozen"), (None, "ema"), (False, "frozen"), (True, "ema")]


def _model():
    from transformers import Qwen2ForCausalLM

    from opd_verl.demo.tiny import build_tokenizer, tiny_qwen2_config

    cfg = tiny_qwen2_config(len(build_tokenizer()), hidden_size=32, num_layers=2)
    cfg.dtype = torch.float32
    assert cfg.tie_word_embeddings  # as in Qwen3-1.7B
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval()


def _train_step(model):
    """Stand-in for optimizer steps: every parameter moves."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1).add_(0.01)


def _loss(logits):
    ids = torch.tensor(IDS)
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).mean()


def _rank(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from verl.utils.fsdp_utils import apply_fsdp2

    from opd_verl.opsd.teacher import TeacherWeights

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", mesh_shape=(WORLD,), mesh_dim_names=("fsdp",))
    for reshard, mode in CASES:
        model = _model()
        kwargs = {"mesh": mesh} if reshard is None else {"mesh": mesh, "reshard_after_forward": reshard}
        apply_fsdp2(model, kwargs, {})  # how veRL's FSDP2 engine wraps the actor
        teacher = TeacherWeights(model, mode, ema_decay=0.5)
        _train_step(model)
        teacher.update()
        ids = torch.tensor(IDS)
        student = model(input_ids=ids).logits  # with grad, as veRL's actor forward before the logits processor
        with torch.no_grad(), teacher.weights():
            teacher_logits = model(input_ids=ids).logits
        _loss(student).backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        result = {"student": student.detach(), "teacher": teacher_logits, "grads": grads}
        torch.save(result, f"{out_dir}/{reshard}_{mode}_rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_teacher_weights_on_fsdp2_sharded_model(tmp_path):
    # the ranks run this file as a script (an installed package named `tests` shadows this directory's modules)
    out = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    ids = torch.tensor(IDS)
    init = _model()
    student = copy.deepcopy(init)
    _train_step(student)
    want_student = student(input_ids=ids).logits
    _loss(want_student).backward()
    for reshard, mode in CASES:
        teacher = copy.deepcopy(init)
        if mode == "ema":  # ema <- 0.5 * ema + 0.5 * theta, once
            with torch.no_grad():
                for t, s in zip(teacher.parameters(), student.parameters()):
                    t.mul_(0.5).add_(0.5 * s)
        with torch.no_grad():
            want_teacher = teacher(input_ids=ids).logits
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"{reshard}_{mode}_rank{rank}.pt")
            case = f"reshard_after_forward={reshard} teacher={mode} rank {rank}"
            torch.testing.assert_close(got["teacher"], want_teacher, rtol=1e-4, atol=1e-5, msg=case)
            torch.testing.assert_close(got["student"], want_student.detach(), rtol=1e-4, atol=1e-5, msg=case)
            for name, p in student.named_parameters():
                torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=f"{case} {name}")


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(_free_port(), sys.argv[1]), nprocs=WORLD)
