import copy

import pytest
import torch

from opd_verl.opsd.teacher import TeacherWeights, is_peft_model


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_ema_matches_manual_ema_after_updates(tiny_model):
    model = tiny_model()
    teacher = TeacherWeights(model, "ema", ema_decay=0.9)
    manual = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for step in range(5):
        _perturb(model, step)
        teacher.update()
        for n, p in model.named_parameters():
            manual[n] = 0.9 * manual[n] + 0.1 * p.detach().double()
    assert teacher.num_updates == 5
    for n, value in teacher.shadow.items():
        torch.testing.assert_close(value.double(), manual[n], rtol=1e-6, atol=1e-6)
    # the shadow differs from the live weights (the EMA lags)
    name = next(iter(teacher.shadow))
    assert not torch.allclose(teacher.shadow[name], dict(model.named_parameters())[name].float())


def test_weights_context_uses_shadow_and_restores(tiny_model):
    model = tiny_model()
    init = copy.deepcopy(model)
    teacher = TeacherWeights(model, "frozen")
    assert teacher.extra_parameters == sum(p.numel() for p in model.parameters())
    _perturb(model, 1)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 256, (2, 7))
    with teacher.weights():
        frozen_logits = _logits(model, ids)
    torch.testing.assert_close(frozen_logits, _logits(init, ids))
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n])
    assert not torch.allclose(_logits(model, ids), frozen_logits)


def test_current_is_the_live_model(tiny_model):
    model = tiny_model()
    teacher = TeacherWeights(model, "current")
    assert teacher.shadow == {} and teacher.extra_parameters == 0
    ids = torch.randint(0, 256, (1, 5))
    with teacher.weights():
        assert torch.equal(_logits(model, ids), _logits(model, ids))
    teacher.update()  # no-op
    assert teacher.num_updates == 0


def test_ema_state_survives_save_restore(tiny_model, tmp_path):
    model = tiny_model()
    teacher = TeacherWeights(model, "ema", ema_decay=0.8)
    for step in range(3):
        _perturb(model, step)
        teacher.update()
    torch.save(teacher.state_dict(), tmp_path / "ema.pt")

    resumed_model = copy.deepcopy(model)
    resumed = TeacherWeights(resumed_model, "ema", ema_decay=0.5)  # fresh shadow = current weights, other decay
    resumed.load_state_dict(torch.load(tmp_path / "ema.pt"))
    assert resumed.decay == 0.8 and resumed.num_updates == 3
    for n in teacher.shadow:
        assert torch.equal(resumed.shadow[n], teacher.shadow[n])
    # training continues identically
    for step in (10, 11):
        _perturb(model, step)
        _perturb(resumed_model, step)
        teacher.update()
        resumed.update()
    for n in teacher.shadow:
        torch.testing.assert_close(resumed.shadow[n], teacher.shadow[n], rtol=0, atol=0)


def test_restore_refuses_other_mode_or_model(tiny_model):
    model = tiny_model()
    ema = TeacherWeights(model, "ema")
    frozen = TeacherWeights(model, "frozen")
    with pytest.raises(ValueError, match="opd.opsd.teacher='frozen'"):
        ema.load_state_dict(frozen.state_dict())
    state = ema.state_dict()
    state["shadow"].pop(next(iter(state["shadow"])))
    with pytest.raises(ValueError, match="does not match the model"):
        ema.load_state_dict(state)


def test_bad_mode_and_decay():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="opd.opsd.teacher='live'"):
        TeacherWeights(model, "live")
    with pytest.raises(ValueError, match="ema_decay=1.0"):
        TeacherWeights(model, "ema", ema_decay=1.0)


peft = pytest.importorskip("peft")


def _lora(model):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
    lora = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # make the adapter non-zero so it changes the outputs
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return lora


def test_lora_frozen_disables_adapter_without_copy(tiny_model):
    base = tiny_model()
    base_copy = copy.deepcopy(base)
    lora = _lora(base)
    assert is_peft_model(lora)
    teacher = TeacherWeights(lora, "frozen")
    assert teacher.adapter_toggle and teacher.extra_parameters == 0
    ids = torch.randint(0, 256, (2, 6))
    with teacher.weights():
        frozen = _logits(lora, ids)
    torch.testing.assert_close(frozen, _logits(base_copy, ids))
    assert not torch.allclose(_logits(lora, ids), frozen)


def test_lora_ema_keeps_adapter_weights_only(tiny_model):
    lora = _lora(tiny_model())
    teacher = TeacherWeights(lora, "ema", ema_decay=0.5)
    assert teacher.shadow and all("lora_" in n for n in teacher.shadow)
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert teacher.extra_parameters == trainable < sum(p.numel() for p in lora.parameters()) // 10
    ids = torch.randint(0, 256, (1, 6))
    before = _logits(lora, ids)
    old = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    _perturb(lora, 3)
    teacher.update()
    # EMA with decay 0.5 after one step: the midpoint of the old and new adapter weights
    mid = copy.deepcopy(lora)
    with torch.no_grad():
        for n, p in mid.named_parameters():
            if p.requires_grad:
                p.copy_(0.5 * old[n] + 0.5 * p)
    with teacher.weights():
        ema_logits = _logits(lora, ids)
    torch.testing.assert_close(ema_logits, _logits(mid, ids))
    assert not torch.allclose(ema_logits, before) and not torch.allclose(ema_logits, _logits(lora, ids))
