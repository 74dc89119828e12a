"""LoRA variants against PEFT: DoRA (logits, dropout path, gradients, --to_peft/--from_peft, merge, serving),
LoRA+ (optimizer groups), PiSSA/OLoRA/gaussian initialisation (A, B at step 0; the saved file on the unmodified
base). Differences are printed (run with -s to see them)."""
import json
import math

import peft
import pytest
import torch
import transformers
from torch import nn

from model.checkpoint import hf_config_dict, load_state_dict_strict, save_model
from model.lora_variants import DoRA, loraplus_param_groups
from model.model_lora import (CONFIG_KEY, AdapterBank, LoRAError, LoRALinear, apply_lora, load_lora, lora_layers,
                              merge_lora, read_lora_file, save_lora, set_adapter, unmerge_lora)
from model.model_minimind import MiniMindForCausalLM
from scripts.convert_model import main as convert
from tests.conftest import tiny_config, varied_model
from tests.test_lora import base_model, logits, randomize_B


def max_diff(ours, theirs, what: str) -> float:
    diff = (ours - theirs).abs().max().item()
    print(f"\nmax |difference| {what}: {diff:.3g}")
    return diff


def spread_magnitude(model, seed=2):
    """Magnitudes start at W0's row norms; move them so that the magnitude really matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_layers(model):
            for lora in m.lora.values():
                if isinstance(lora, DoRA):
                    lora.magnitude.mul_(0.5 + torch.rand(lora.magnitude.shape, generator=g))


def dora_model(seed=0, **kw):
    model = base_model(seed)
    apply_lora(model, rank=4, alpha=8, use_dora=True, **kw)
    randomize_B(model)
    spread_magnitude(model)
    return model


def hf_copy(ours):
    """transformers' Qwen3 holding our base weights (our keys are Qwen3's)."""
    cfg = transformers.Qwen3Config(**{k: v for k, v in hf_config_dict(ours.config).items()
                                      if k not in ("architectures", "model_type", "torch_dtype")})
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict({k: v for k, v in ours.state_dict().items() if ".lora." not in k},
                                             strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf


def copy_into_peft(ours, theirs, name="default"):
    with torch.no_grad():
        for module, m in lora_layers(ours):
            t = theirs.base_model.model.get_submodule(module)
            t.lora_A[name].weight.copy_(m.lora[name].A.weight)
            t.lora_B[name].weight.copy_(m.lora[name].B.weight)
            if isinstance(m.lora[name], DoRA):
                t.lora_magnitude_vector[name].weight.copy_(m.lora[name].magnitude)


from tests.test_peft_interop import base  # noqa: E402,F401  (fixture: our base checkpoint and its --to_hf export)


@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_dora_logits_equal_peft(targets):
    ours = dora_model(target_modules=targets)
    theirs = peft.get_peft_model(hf_copy(ours), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                 target_modules=targets or ["q_proj", "o_proj"]))
    # PEFT's own magnitude initialisation: W0's row norms, as ours before spread_magnitude
    fresh = base_model()
    apply_lora(fresh, rank=4, alpha=8, use_dora=True, target_modules=targets)
    peft_m = {n: theirs.base_model.model.get_submodule(n).lora_magnitude_vector["default"].weight for n, _ in
              lora_layers(fresh)}
    assert max((m.lora["default"].magnitude - peft_m[n]).abs().max().item() for n, m in lora_layers(fresh)) <= 1e-6
    copy_into_peft(ours, theirs.eval())
    assert max_diff(logits(ours), logits(theirs), f"DoRA logits, ours vs PEFT ({targets})") <= 1e-5
    with theirs.disable_adapter():
        assert not torch.allclose(logits(ours), logits(theirs), atol=1e-3)  # the adapter is really on


def test_dora_dropout_path_and_gradients_equal_peft():
    """In training with dropout PEFT's DoRA takes another path (W0 sees the dropped input); the output and the
    gradients of A, B and the magnitude equal PEFT's DoraLinearLayer given the same dropped input."""
    from peft.tuners.lora.dora import DoraLinearLayer
    torch.manual_seed(0)
    base = nn.Linear(24, 16, bias=True).requires_grad_(False)
    layer = LoRALinear(base)
    lora = DoRA(24, 16, rank=4, alpha=8, dropout=0.3)
    nn.init.normal_(lora.B.weight, std=0.2)
    lora.init_magnitude(layer.weight)
    with torch.no_grad():
        lora.magnitude.mul_(torch.linspace(0.5, 1.5, 16))
    layer.lora["d"] = lora
    layer.active_adapter = "d"
    x = torch.randn(3, 5, 24)
    torch.manual_seed(7)
    ours = layer(x)
    torch.manual_seed(7)
    xd = lora.dropout(x)  # the same mask
    assert not torch.equal(xd, x)
    ref = DoraLinearLayer(fan_in_fan_out=False)
    a, b = nn.Linear(24, 4, bias=False), nn.Linear(4, 16, bias=False)
    with torch.no_grad():
        a.weight.copy_(lora.A.weight)
        b.weight.copy_(lora.B.weight)
    ref.weight = nn.Parameter(lora.magnitude.detach().clone())
    theirs = base(x).detach() + ref(xd, lora_A=a, lora_B=b, scaling=lora.scale, base_layer=base, base_result=None)
    assert max_diff(ours, theirs, "DoRA with dropout, output") <= 1e-5
    grad = torch.randn_like(ours)
    ours.backward(grad)
    theirs.backward(grad)
    for mine, peft_param, what in ((lora.A.weight, a.weight, "A"), (lora.B.weight, b.weight, "B"),
                                   (lora.magnitude, ref.weight, "magnitude")):
        assert max_diff(mine.grad, peft_param.grad, f"gradient of {what}") <= 1e-5


def test_dora_without_dropout_gradients_equal_peft():
    ours = dora_model()
    theirs = peft.get_peft_model(hf_copy(ours), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                 target_modules=["q_proj", "o_proj"]))
    copy_into_peft(ours, theirs)
    x = torch.randint(0, 512, (2, 9))
    ours(x, labels=x).loss.backward()
    theirs(input_ids=x, labels=x).loss.backward()
    worst = 0.0
    for module, m in lora_layers(ours):
        t = theirs.base_model.model.get_submodule(module)
        for mine, their in ((m.lora["default"].A.weight, t.lora_A["default"].weight),
                            (m.lora["default"].B.weight, t.lora_B["default"].weight),
                            (m.lora["default"].magnitude, t.lora_magnitude_vector["default"].weight)):
            worst = max(worst, (mine.grad - their.grad).abs().max().item())
    print(f"\nmax |gradient difference| DoRA, ours vs PEFT: {worst:.3g}")
    assert worst <= 1e-5


def test_dora_through_to_peft_and_from_peft_both_ways(tmp_path, base):
    weight, hf_dir = base
    ours = dora_model(target_modules="all-linear")
    path = save_lora(ours, tmp_path / "lora_d_64.safetensors")
    state = read_lora_file(path)
    assert "model.layers.0.self_attn.q_proj.lora.magnitude" in state
    assert json.loads(state[CONFIG_KEY])["use_dora"] is True
    convert(["--to_peft", str(tmp_path / "peft"), "--weight", str(weight), "--lora", str(path),
             "--base_model_name_or_path", str(hf_dir)])
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(transformers.Qwen3ForCausalLM.from_pretrained(hf_dir),
                                            tmp_path / "peft").eval()
    assert max_diff(logits(ours), logits(theirs), "DoRA ours -> --to_peft -> PEFT") <= 1e-5

    # PEFT's own DoRA folder (its own save_pretrained), back to ours.
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.mul_(1.3)
    theirs.save_pretrained(tmp_path / "peft2")
    convert(["--from_peft", str(tmp_path / "peft2"), "--out", str(tmp_path / "lora_back_64.pth")])
    back = base_model()
    load_lora(back, tmp_path / "lora_back_64.pth")
    back.eval()
    assert max_diff(logits(back), logits(theirs), "DoRA PEFT -> --from_peft -> ours") <= 1e-5
    assert not torch.allclose(logits(back), logits(ours), atol=1e-3)  # the scaled magnitudes came through


def test_dora_merge_and_unmerge_are_exact():
    model = dora_model(target_modules="all-linear")
    w0 = {n: m.weight.detach().clone() for n, m in lora_layers(model)}
    want = logits(model)
    merge_lora(model)
    assert max_diff(logits(model), want, "DoRA merged vs unmerged logits") <= 1e-5
    unmerge_lora(model)
    assert max_diff(logits(model), want, "DoRA unmerged again") <= 1e-5
    assert max((m.weight - w0[n]).abs().max().item() for n, m in lora_layers(model)) <= 1e-5  # W0 back


def test_dora_files_load_old_files_still_load_and_mismatches_are_one_line(tmp_path):
    model = dora_model()
    path = save_lora(model, tmp_path / "lora_d_64.pth")
    fresh = base_model()
    load_lora(fresh, path)
    fresh.eval()
    assert max_diff(logits(fresh), logits(model), "DoRA saved and loaded") <= 1e-6
    # A plain file (no magnitude, no use_dora: made before DoRA existed) loads as plain LoRA.
    state = {k: v for k, v in torch.load(path, weights_only=True).items() if ".magnitude" not in k}
    config = json.loads(state[CONFIG_KEY])
    del config["use_dora"], config["init_lora_weights"]
    state[CONFIG_KEY] = json.dumps(config)
    torch.save(state, tmp_path / "old_64.pth")
    plain = base_model()
    load_lora(plain, tmp_path / "old_64.pth")
    assert not any(isinstance(m.lora["old"], DoRA) for _, m in lora_layers(plain))
    # use_dora claimed with no magnitudes; a magnitude of the wrong length: one line each
    config["use_dora"] = True
    state[CONFIG_KEY] = json.dumps(config)
    torch.save(state, tmp_path / "liar_64.pth")
    with pytest.raises(LoRAError, match="says use_dora but the file holds no lora.magnitude") as e:
        load_lora(base_model(), tmp_path / "liar_64.pth")
    assert len(str(e.value).splitlines()) == 1
    bad = torch.load(path, weights_only=True)
    bad["model.layers.0.self_attn.q_proj.lora.magnitude"] = torch.ones(3)
    torch.save(bad, tmp_path / "bad_64.pth")
    with pytest.raises(LoRAError, match=r"q_proj has lora.magnitude of shape \(3,\); expected \(64,\)"):
        load_lora(base_model(), tmp_path / "bad_64.pth")


def test_dora_on_a_merged_model_is_refused_in_one_line(tmp_path):
    model = base_model()
    apply_lora(model, rank=4, adapter_name="plain")
    merge_lora(model)
    with pytest.raises(LoRAError) as e:
        apply_lora(model, rank=4, use_dora=True, adapter_name="d")
    assert "merged into the base weights; call unmerge_lora(model) before adding an adapter" in str(e.value)
    save_lora(dora_model(), tmp_path / "lora_d_64.pth")
    with pytest.raises(LoRAError, match="merged into the base weights"):
        load_lora(model, tmp_path / "lora_d_64.pth")
    with pytest.raises(LoRAError, match="merged into the base weights"):
        AdapterBank(model, slots=1)


def test_bank_serves_dora_rows_beside_plain_rows_as_each_alone(tmp_path):
    """Mixed batch: DoRA, plain LoRA and no adapter, each row equal to that adapter loaded alone."""
    maker = varied_model(0)
    apply_lora(maker, rank=4, alpha=8, use_dora=True, target_modules="all-linear", adapter_name="d")
    randomize_B(maker, "d")
    spread_magnitude(maker)
    save_lora(maker, tmp_path / "d.pth", "d")
    apply_lora(maker, rank=8, alpha=8, adapter_name="p")
    randomize_B(maker, "p", seed=3)
    save_lora(maker, tmp_path / "p.pth", "p")
    ref = varied_model(0)
    load_lora(ref, tmp_path / "d.pth", "d")
    load_lora(ref, tmp_path / "p.pth", "p")
    ref.eval()
    x = torch.randint(0, 3000, (4, 6))
    want = []
    for row, name in enumerate(["d", None, "p", "d"]):
        set_adapter(ref, name)
        want.append(logits(ref, x[row:row + 1])[0])
    model = varied_model(0)
    bank = AdapterBank(model, slots=2, max_rank=8)
    bank.load(1, tmp_path / "d.pth")
    bank.load(2, tmp_path / "p.pth")
    bank.select([1, 0, 2, 1])
    got = logits(model, x)
    assert max(max_diff(got[r], want[r], f"bank row {r}") for r in range(4)) <= 1e-4
    assert not torch.allclose(want[0], want[1], atol=1e-2)
    bank.clear(1)
    bank.select([1])
    set_adapter(ref, None)
    assert max_diff(logits(model, x[:1])[0], logits(ref, x[:1])[0], "cleared DoRA slot") <= 1e-5


def peft_names(model, params) -> list:
    """Our LoRA parameters under PEFT's names, in order."""
    ours = {id(p): n for n, p in model.named_parameters()}
    out = []
    for p in params:
        module, _, rest = ours[id(p)].partition(".lora.default.")
        out.append(f"base_model.model.{module}." + {"A.weight": "lora_A.default.weight", "B.weight":
                   "lora_B.default.weight", "magnitude": "lora_magnitude_vector.default.weight"}[rest])
    return out


@pytest.mark.parametrize("use_dora,weight_decay", [(False, 0.0), (True, 0.0), (True, 0.1)])
def test_loraplus_groups_equal_peft_create_loraplus_optimizer(use_dora, weight_decay):
    from peft.optimizers import create_loraplus_optimizer
    ours = base_model()
    apply_lora(ours, rank=4, alpha=8, target_modules="all-linear", use_dora=use_dora)
    theirs = peft.get_peft_model(hf_copy(ours), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                 use_dora=use_dora))
    their_opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=2e-3, loraplus_lr_ratio=16,
                                          loraplus_weight_decay=weight_decay)  # PEFT's name for the groups' decay
    our_opt = torch.optim.AdamW(loraplus_param_groups(ours, 2e-3, 16, weight_decay=weight_decay), lr=2e-3)
    names = {id(p): n for n, p in theirs.named_parameters()}
    theirs_groups = [(g["lr"], g["weight_decay"], [names[id(p)] for p in g["params"]])
                     for g in their_opt.param_groups if g["params"]]
    ours_groups = [(g["lr"], g["weight_decay"], peft_names(ours, g["params"])) for g in our_opt.param_groups]
    assert ours_groups == theirs_groups
    assert [(lr, wd) for lr, wd, _ in ours_groups] == [(2e-3, weight_decay), (2e-3 * 16, weight_decay)]
    assert any("magnitude" in n for n in ours_groups[1][2]) == use_dora  # PEFT: 1-d parameters learn at B's rate


def test_pissa_and_olora_start_equal_peft_and_keep_the_model():
    for init in ("pissa", "olora"):
        original = base_model()
        want = logits(original)
        ours = base_model()
        apply_lora(ours, rank=4, alpha=8, target_modules="all-linear", init_lora_weights=init)
        theirs = peft.get_peft_model(hf_copy(original), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                         init_lora_weights=init))
        worst = 0.0
        for module, m in lora_layers(ours):
            t = theirs.base_model.model.get_submodule(module)
            for mine, their in ((m.lora["default"].A.weight, t.lora_A["default"].weight),
                                (m.lora["default"].B.weight, t.lora_B["default"].weight),
                                (m.weight, t.base_layer.weight)):
                worst = max(worst, (mine - their).abs().max().item())
        print(f"\nmax |A, B, residual W difference| {init} ours vs PEFT at step 0: {worst:.3g}")
        assert worst <= 1e-6
        assert max_diff(logits(ours), want, f"{init} at step 0 vs the base") <= 1e-4  # W_res + sBA = W0


def train_a_few_steps(model, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        x = torch.randint(0, 512, (2, 12), generator=g)
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("init, use_dora, use_rslora", [("pissa", False, False), ("olora", True, True)])
def test_a_saved_pissa_or_olora_adapter_works_on_the_unmodified_base(tmp_path, init, use_dora, use_rslora):
    model = base_model()
    apply_lora(model, rank=4, alpha=8, target_modules="all-linear", init_lora_weights=init, use_dora=use_dora,
               use_rslora=use_rslora)
    train_a_few_steps(model)
    path = save_lora(model, tmp_path / "lora_p_64.safetensors")
    config = json.loads(read_lora_file(path)[CONFIG_KEY])
    assert (config["rank"], config["alpha"], config["init_lora_weights"]) == \
           (8, 8 * (math.sqrt(2) if use_rslora else 2), init)
    fresh = base_model()  # the original base, never touched by the SVD/QR
    load_lora(fresh, path)
    fresh.eval()
    assert max_diff(logits(fresh), logits(model), f"{init} (DoRA {use_dora}) trained vs file on the original "
                                                  f"base") <= 1e-5
    assert not torch.allclose(logits(fresh), logits(base_model()), atol=1e-3)  # training moved it
    # The fingerprint is the original base's: loading onto it raised no warning, and the probe says so.
    assert config["base"]["probe"] == json.loads(read_lora_file(save_lora(fresh, tmp_path / "again_64.pth"))
                                                 [CONFIG_KEY])["base"]["probe"]


def test_pissa_file_equals_peft_path_initial_model_for_weight_conversion(tmp_path):
    original = base_model()
    ours = base_model()
    apply_lora(ours, rank=4, alpha=8, init_lora_weights="pissa")
    theirs = peft.get_peft_model(hf_copy(original), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                                                     target_modules=["q_proj", "o_proj"]))
    theirs.save_pretrained(tmp_path / "init")  # PEFT's recipe: the adapter as initialised, before training
    train_a_few_steps(ours)
    copy_into_peft(ours, theirs)
    theirs.save_pretrained(tmp_path / "trained", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    peft_state = read_lora_file(tmp_path / "trained")
    our_state = read_lora_file(save_lora(ours, tmp_path / "lora_p_64.pth"))
    assert set(peft_state) == set(our_state)
    worst = max((peft_state[k] - our_state[k]).abs().max().item() for k in our_state if k != CONFIG_KEY)
    print(f"\nmax |tensor difference| our PiSSA file vs PEFT's converted one: {worst:.3g}")
    assert worst == 0
    p, o = json.loads(peft_state[CONFIG_KEY]), json.loads(our_state[CONFIG_KEY])
    assert (p["rank"], p["alpha"]) == (o["rank"], o["alpha"]) == (8, 16)


def test_gaussian_init_and_unknown_init_refused_in_one_line():
    model = base_model()
    apply_lora(model, rank=4, target_modules="all-linear", init_lora_weights="gaussian")
    a = torch.cat([m.lora["default"].A.weight.flatten() for _, m in lora_layers(model)])
    assert abs(a.std().item() - 1 / 4) < 0.02 and a.abs().max() > 0.5  # N(0, 1/r), not Kaiming-uniform's bound
    assert all(m.lora["default"].B.weight.abs().sum() == 0 for _, m in lora_layers(model))
    for bad in ("svd", "pissa_niter_", "pissa_niter_0"):
        with pytest.raises(LoRAError) as e:
            apply_lora(base_model(), init_lora_weights=bad)
        assert str(e.value).startswith(f"init_lora_weights {bad!r} is not known; use one of default, gaussian, "
                                       f"pissa, olora or pissa_niter_N")
    with pytest.raises(LoRAError, match="changes the base weights, but the model already holds adapters"):
        apply_lora(model, adapter_name="second", init_lora_weights="pissa")


def test_pissa_niter_starts_at_the_base():
    model = base_model()
    want = logits(model)
    apply_lora(model, rank=4, alpha=8, init_lora_weights="pissa_niter_4")
    assert all(m.lora["default"].B.weight.abs().sum() > 0 for _, m in lora_layers(model))  # taken from W0, not 0
    assert max_diff(logits(model), want, "pissa_niter_4 at step 0 vs the base") <= 1e-4


@pytest.fixture(scope="module")
def sft_base(tmp_path_factory):
    """A tiny full_sft_64.pth (one step from scratch: the variants need a base, not a good one) and LoRA data."""
    from tests.test_trainer import DEMO, TINY, head
    from trainer import train_full_sft
    from trainer.trainer_utils import run_main
    tmp = tmp_path_factory.mktemp("sft")
    sft = head(DEMO / "sft.jsonl", tmp / "sft.jsonl", 16)
    assert run_main(train_full_sft.main, TINY + ["--save_dir", str(tmp / "out"), "--data_path", str(sft),
                                                 "--from_weight", "none", "--max_steps", "1"]) == 0
    return tmp / "out", head(DEMO / "lora_identity.jsonl", tmp / "lora_identity.jsonl", 16)


def test_train_lora_dora_pissa_loraplus_saves_and_resumes_to_the_same_adapter(sft_base, capsys, monkeypatch):
    """One run with all three, straight and killed after its step-2 checkpoint then resumed WITHOUT the LoRA+ flag:
    the same file; the metadata records each variant; the resume checkpoint's groups carry the ratio."""
    from model.checkpoint import safe_torch_load
    from tests.test_trainer import TINY, Crash
    from trainer import train_lora, trainer_utils
    out, data = sft_base
    common = TINY + ["--save_dir", str(out), "--data_path", str(data), "--max_steps", "4", "--save_interval", "2",
                     "--replay_data", "none", "--lora_rank", "4", "--use_dora", "--init_lora_weights", "pissa"]
    train_lora.main(common + ["--lora_name", "straight", "--loraplus_lr_ratio", "16"])
    assert "DoRA, init pissa, LoRA+ (B's lr x 16)" in capsys.readouterr().out
    save = trainer_utils.atomic_torch_save

    def save_then_crash(obj, path):
        save(obj, path)
        if isinstance(obj, dict) and obj.get("step") == 2:
            raise Crash

    monkeypatch.setattr(trainer_utils, "atomic_torch_save", save_then_crash)
    with pytest.raises(Crash):
        train_lora.main(common + ["--lora_name", "resumed", "--loraplus_lr_ratio", "16"])
    monkeypatch.setattr(trainer_utils, "atomic_torch_save", save)
    ckpt = safe_torch_load(out / "checkpoints" / "resumed_64_resume.pth")
    assert [g["lr_ratio"] for g in ckpt["optimizer"]["param_groups"]] == [1.0, 16.0]
    with pytest.raises(trainer_utils.TrainError, match="saved with --loraplus_lr_ratio 16.0, this run asks for 4"):
        train_lora.main(common + ["--lora_name", "resumed", "--from_resume", "1", "--loraplus_lr_ratio", "4"])
    train_lora.main(common + ["--lora_name", "resumed", "--from_resume", "1"])  # the saved ratio is kept
    a, b = (read_lora_file(out / "lora" / f"{n}_64.pth") for n in ("straight", "resumed"))
    assert a.keys() == b.keys() and any(k.endswith(".lora.magnitude") for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a if k != CONFIG_KEY) == 0
    config = json.loads(a[CONFIG_KEY])
    assert (config["use_dora"], config["init_lora_weights"], config["loraplus_lr_ratio"], config["rank"]) == \
           (True, "pissa", 16.0, 8)  # PiSSA saved converted: rank 2r


def test_train_lora_unknown_init_is_one_line(sft_base, capsys):
    from tests.test_trainer import TINY, run
    from trainer import train_lora
    out, data = sft_base
    code, log, err = run(train_lora.main, TINY + ["--save_dir", str(out), "--data_path", str(data),
                                                  "--init_lora_weights", "svd"], capsys)
    assert code == 2 and err.strip().splitlines() == [
        "error: init_lora_weights 'svd' is not known; use one of default, gaussian, pissa, olora or pissa_niter_N "
        "(N >= 1: PiSSA by a randomised SVD of N iterations)"]


def test_dora_norm_kept_between_forwards_is_redone_when_a_weight_changes():
    model = dora_model()
    x = torch.randint(0, 512, (1, 5))
    logits(model, x)
    layer = lora_layers(model)[0][1]
    kept = layer.lora["default"]._norm
    logits(model, x)
    assert layer.lora["default"]._norm is kept  # decoding a token does not redo the d x k norm
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora["default"].B.weight.mul_(3)  # in place, as an optimizer step
    fresh = base_model()
    apply_lora(fresh, rank=4, alpha=8, use_dora=True)
    for (_, m), (_, f) in zip(lora_layers(model), lora_layers(fresh)):
        with torch.no_grad():
            for name in ("A", "B"):
                getattr(f.lora["default"], name).weight.copy_(getattr(m.lora["default"], name).weight)
            f.lora["default"].magnitude.copy_(m.lora["default"].magnitude)
    assert max_diff(logits(model, x), logits(fresh, x), "DoRA after an in-place change of B vs fresh") <= 1e-5


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """out/full_sft_64.pth of a varied tiny base, a DoRA adapter and a plain one for it."""
    out = tmp_path_factory.mktemp("served") / "out"
    model = varied_model(0)
    save_model(model, out / "full_sft_64.pth")
    apply_lora(model, rank=4, alpha=8, use_dora=True, target_modules="all-linear", adapter_name="lora_d")
    randomize_B(model, "lora_d")
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora["lora_d"].B.weight.mul_(10)
    spread_magnitude(model)
    save_lora(model, out / "lora" / "lora_d_64.pth", "lora_d")
    apply_lora(model, rank=4, alpha=8, adapter_name="lora_p")
    randomize_B(model, "lora_p", seed=5)
    save_lora(model, out / "lora" / "lora_p_64.pth", "lora_p")
    return out


def test_eval_llm_answers_with_a_dora_adapter_merged_or_not(served, capsys):
    import eval_llm

    def run(*extra):
        assert eval_llm.main(["--save_dir", str(served), "--hidden_size", "64", "--temperature", "0",
                              "--max_new_tokens", "8", "--prompt", "hello", *extra]) == 0
        return capsys.readouterr().out

    base, dora = run(), run("--lora_weight", "lora_d")
    assert run("--lora_weight", "lora_d", "--merge") == dora
    assert dora.split("] ", 1)[1] != base.split("\n", 1)[1]  # the adapter changes the reply


def test_engine_serves_dora_and_plain_rows_together_as_each_alone(served):
    from model.engine import Engine, Request
    from model.tokenizer import Tokenizer
    from tests.conftest import solo_reply
    from tests.test_engine import run
    tok = Tokenizer()
    engine = Engine(varied_model(0), tok, max_batch=4, max_seq_len=64, max_loras=2, max_lora_rank=4).start()
    try:
        engine.register("d", served / "lora" / "lora_d_64.pth")
        engine.register("p", served / "lora" / "lora_p_64.pth")
        prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=True)
        events = run(engine, Request(prompt, "d", max_tokens=6), Request(prompt, "p", max_tokens=6),
                     Request(prompt, None, max_tokens=6))
        replies = [e[-1]["text"] for e in events]
        want = [solo_reply(varied_model(0), tok, prompt, 6, served / "lora" / f"lora_{n}_64.pth") for n in "dp"]
        assert replies[:2] == want and replies[2] == solo_reply(varied_model(0), tok, prompt, 6)
        assert len(set(replies)) == 3
    finally:
        engine.stop()


def test_lora_stats_counts_doras_magnitude_vectors(capsys):
    from model.model_lora import lora_parameters
    from scripts.lora_stats import lora_table, main
    config = tiny_config()
    model = MiniMindForCausalLM(config)
    apply_lora(model, rank=4, target_modules="all-linear", use_dora=True)
    table = lora_table(config, 4, "all-linear", use_dora=True)
    assert table["lora"] == sum(p.numel() for p in lora_parameters(model))
    assert table["magnitudes"] == sum(m.out_features for _, m in lora_layers(model)) and table["modules"] == 14
    assert table["lora"] - lora_table(config, 4, "all-linear")["lora"] == table["magnitudes"]
    main(["--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4", "--num_key_value_heads",
          "2", "--vocab_size", "512", "--lora_rank", "4", "--lora_targets", "all-linear", "--use_dora"])
    assert f"DoRA magnitude vectors: 14 (one per module, d values each): {table['magnitudes']:,} of the " \
           f"{table['lora']:,} trained parameters" in capsys.readouterr().out
