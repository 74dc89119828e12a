"""The one training loop behind train_pretrain.py, train_full_sft.py and train_lora.py.

Notable choices:
- The loss of an optimizer step is the mean over every target token of the global batch (all
  micro-batches, all ranks), so DDP, FSDP2 (--fsdp 1: trainer/distributed.py) and gradient accumulation give the
  same update as one big batch.
- Data order is a seeded list of batches per epoch, split across ranks; resume skips the batches already
  seen, and restores optimizer, scaler, schedule and RNG, so a resumed run ends on the same weights.
- The host syncs with the device only every --log_interval steps (loss, NaN check) and at saves.
- Nothing is saved after a non-finite loss: the last good checkpoint stays.
"""
import argparse
import contextlib
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # scripts run as `python trainer/train_x.py` from any directory
    sys.path.insert(0, str(REPO_ROOT))

from model.checkpoint import (CheckpointError, atomic_torch_save, load_model, load_state_dict_strict,  # noqa: E402
                              safe_torch_load, save_model, unwrap)
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402
from trainer import distributed  # noqa: E402
from dataset.lm_dataset import (DataError, LengthGroupedBatchSampler, PackedDataset, PadCollator,  # noqa: E402
                                ReplayMix, SFTDataset, is_chat_file)

DEMO_DIR = REPO_ROOT / "dataset" / "demo"


class TrainError(RuntimeError):
    """Bad input or a failed run; main() prints the message as one line and exits."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, refused in one line by the parser otherwise."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: must be 1 or more")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: must be 0 or more")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not allowed: must be a finite number above 0")
    return value


def nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not allowed: must be a finite number, 0 or more")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default in --help (a None or False default says nothing: its help tells); the description's
    own line breaks kept."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


# A fresh model's shape. With --from_weight the weights decide, and a flag given by hand must agree with them.
# 160 wide: the demo's targets hold at 160 as at 256 in half the compute (docs/DEMO_RECIPE.md, "Faster").
FRESH_SHAPE = {"hidden_size": 160, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4}


class Parser(argparse.ArgumentParser):
    """argparse with --help showing every default, and a bad flag refused in one line."""

    def __init__(self, **kw):
        super().__init__(formatter_class=HelpFormatter, **kw)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        ns.given_shape = {k: getattr(ns, k) for k in FRESH_SHAPE if getattr(ns, k, None) is not None}
        for k, v in FRESH_SHAPE.items():
            if getattr(ns, k, v) is None:
                setattr(ns, k, v)
        return ns


def build_parser(description: str, **defaults) -> argparse.ArgumentParser:
    """The flags MiniMind users know, with each trainer's defaults; --help shows every default."""
    p = Parser(description=description)
    a = p.add_argument
    a("--save_dir", default=str(REPO_ROOT / "out"), help="where weights go (adapters in its lora/ folder)")
    a("--save_weight", default=defaults.pop("save_weight"), help="output name prefix: {save_weight}_{hidden}.pth")
    data_path = defaults.pop("data_path")
    a("--data_path", default=str(data_path) if data_path else None, help="jsonl training data")
    auto = defaults.get("auto_epochs_steps")  # train_lora: epochs follow the data's size
    a("--epochs", type=positive_int, default=1, help="passes over the training data" + (
        f" (default: enough for about {auto} optimizer steps)" if auto else ""))
    a("--batch_size", type=positive_int, default=16, help="samples per process, per micro-batch")
    a("--learning_rate", type=positive_float, default=5e-4, help="peak learning rate (warmup, then --lr_schedule)")
    a("--weight_decay", type=nonnegative_float, default=0.0, help="AdamW's decoupled weight decay on what trains")
    a("--lr_schedule", default="cosine", choices=["cosine", "wsd"],
      help="after warmup: cosine decay to 10%%, or wsd: held, then a linear fall to 10%% over the last 20%% of steps")
    a("--optimizer", default="adamw", choices=["adamw", "muon"],
      help="muon: torch.optim.Muon on the 2-D matrices that train (embeddings excepted; on CPU it orthogonalises in "
           "float32), AdamW on the rest")
    a("--device", default="cuda:0" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    a("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
      help="autocast dtype on CUDA; the CPU trains in float32")
    a("--num_workers", type=nonnegative_int, default=0, help="DataLoader worker processes")
    a("--accumulation_steps", type=positive_int, default=1, help="micro-batches per optimizer step")
    a("--grad_clip", type=nonnegative_float, default=1.0, help="clip the gradient norm to this (0: off)")
    a("--warmup_steps", type=nonnegative_int, default=None, help="linear warmup steps (default: 2%% of the steps)")
    a("--log_interval", type=positive_int, default=10, help="optimizer steps per log line and loss-curve point")
    a("--save_interval", type=positive_int, default=200, help="optimizer steps between saves (and at the end)")
    a("--eval_data_path", default=None, help="held-out jsonl scored every --eval_interval steps and at the end")
    a("--eval_interval", type=nonnegative_int, default=0, help="optimizer steps between held-out scores (0: end only)")
    a("--eval_batches", type=positive_int, default=20, help="batches of --eval_data_path per score")
    a("--hidden_size", type=positive_int, default=None,
      help="model width, the {hidden} in file names (default: a fresh model's 160; else the base weights')")
    a("--num_hidden_layers", type=positive_int, default=None, help="decoder layers (default: a fresh model's 4)")
    a("--num_attention_heads", type=positive_int, default=None, help="query heads (default: a fresh model's 8)")
    a("--num_key_value_heads", type=positive_int, default=None, help="key/value heads, GQA (default: a fresh "
                                                                     "model's 4)")
    a("--intermediate_size", type=int, default=None,
      help="MLP width of a fresh model (default: ceil(hidden_size * pi / 64) * 64)")
    a("--max_seq_len", type=positive_int, default=256, help="tokens per sample; longer samples are cut")
    a("--from_weight", default=defaults.pop("from_weight"), help="base weights to start from ('none': random)")
    a("--from_resume", type=int, default=0, choices=[0, 1], help="1: continue from the last resume checkpoint")
    a("--use_wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    a("--wandb_project", default="MiniMind", help="the wandb project")
    a("--use_compile", type=int, default=0, choices=[0, 1], help="1: torch.compile the model")
    a("--fsdp", type=int, default=0, choices=[0, 1],
      help="1: under torchrun, shard weights, gradients and optimizer state over the processes (FSDP2) "
           "instead of replicating them (DDP)")
    a("--max_steps", type=nonnegative_int, default=0, help="stop after this many optimizer steps (0: run all epochs)")
    a("--seed", type=int, default=42, help="seeds initialisation, data order and dropout")
    a("--skip_bad_lines", action="store_true", help="skip and count malformed data lines instead of stopping")
    a("--group_by_length", type=int, default=1, choices=[0, 1],
      help="1: batch samples of similar length together (less padding); 0: plain random batches")
    p.set_defaults(pack=0, **defaults)  # --pack is train_pretrain's own flag; the other trainers never pack
    return p


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    autocast: contextlib.AbstractContextManager
    scaler: Optional[torch.amp.GradScaler]
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(args) -> Runtime:
    """Single process, or torchrun DDP/FSDP2 (NCCL on CUDA, gloo on CPU); seeds every RNG."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = bool(getattr(args, "fsdp", 0))
    if fsdp and "MASTER_ADDR" not in os.environ:
        raise TrainError("--fsdp 1 shards over the processes of a torchrun launch; run it as `torchrun "
                         "--nproc_per_node N trainer/...py ... --fsdp 1`, or drop --fsdp")
    if fsdp and args.dtype == "float16" and args.device.startswith("cuda"):
        raise TrainError("--fsdp 1 --dtype float16: loss scaling is not wired for sharded gradients; "
                         "use --dtype bfloat16")
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"--device {args.device}: CUDA is not available here; use --device cpu")
        if world_size > 1:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if (world_size > 1 or fsdp) and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    set_seed(args.seed)
    dtype = DTYPES[args.dtype]
    use_amp = device.type == "cuda" and dtype != torch.float32
    autocast = torch.autocast("cuda", dtype=dtype) if use_amp else contextlib.nullcontext()
    scaler = torch.amp.GradScaler("cuda") if use_amp and dtype == torch.float16 else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(rank, local_rank, world_size, device, autocast, scaler, fsdp)


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def weight_path(save_dir, name: str, hidden_size: int) -> Path:
    return Path(save_dir) / f"{name}_{hidden_size}.pth"


def model_config(args) -> MiniMindConfig:
    if args.intermediate_size is not None and args.intermediate_size < 1:
        raise TrainError(f"--intermediate_size {args.intermediate_size}: the MLP width must be at least 1")
    return MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                          num_attention_heads=args.num_attention_heads,
                          num_key_value_heads=args.num_key_value_heads,
                          intermediate_size=args.intermediate_size)


MAKES = {"pretrain": "python trainer/train_pretrain.py", "full_sft": "python trainer/train_full_sft.py"}


def init_model(args, tokenizer_vocab: int) -> MiniMindForCausalLM:
    """A fresh model (--from_weight none) or the base weights named by --from_weight."""
    if args.from_weight in (None, "", "none"):
        config = model_config(args)
        config.vocab_size = tokenizer_vocab
        return MiniMindForCausalLM(config)
    path = Path(args.from_weight)
    if not path.suffix:  # a name, MiniMind-style: out/{name}_{h}.pth
        path = weight_path(args.save_dir, args.from_weight, args.hidden_size)
    if not path.is_file():
        make = MAKES.get(args.from_weight, "the trainer that writes it")
        raise TrainError(f"--from_weight {args.from_weight}: {path} does not exist; make it first with `{make}`"
                         f" (same --hidden_size {args.hidden_size})")
    try:
        model = load_model(path)  # the sidecar's config, or the tensors' shapes
    except CheckpointError as e:
        raise TrainError(str(e)) from None
    for flag, given in getattr(args, "given_shape", {}).items():
        if getattr(model.config, flag) != given:
            raise TrainError(f"--{flag} {given}, but --from_weight {path} holds a model with {flag} "
                             f"{getattr(model.config, flag)}; drop --{flag} (the weights decide) or pick other weights")
    for flag in FRESH_SHAPE:  # file names ({name}_{hidden}) and the resume check follow the weights
        setattr(args, flag, getattr(model.config, flag))
    if model.config.vocab_size != tokenizer_vocab:
        raise TrainError(f"{path}: vocab size {model.config.vocab_size} differs from the tokenizer's "
                         f"{tokenizer_vocab}; train with the tokenizer the base was trained with")
    return model


def wsd_lr(step: int, total: int, base_lr: float, warmup: int, decay_frac: float = 0.2) -> float:
    """Warmup-stable-decay: linear warmup, base_lr held, then a linear fall to 10% of it over the last decay_frac of
    the steps (the floor cosine_lr ends on); the stable phase lets a run be extended, the decay does the annealing."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    decay_start = max(warmup, total - round(decay_frac * total))
    if step < decay_start:
        return base_lr
    progress = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
    return base_lr * (1.0 - 0.9 * progress)


def cosine_lr(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of base_lr (MiniMind's floor)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # Plain lists and numbers only, so the resume file loads with weights_only=True.
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


MIN_USEFUL_STEPS = 50  # below this the plan line warns


def replay_key(args) -> tuple:
    """What a resume must match of the replay mix: (file, ratio), or (none, 0)."""
    replay = getattr(args, "replay_path", None)
    return (str(replay), float(args.replay_ratio)) if replay else ("none", 0.0)


class NonFiniteLoss(TrainError):
    pass


@dataclass
class TrainState:
    step: int = 0          # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # per rank, for resume
    tokens_seen: int = 0
    history: list = None   # one dict per log point ({"step", "loss", "lr", ...}), for the loss curve

    def __post_init__(self):
        self.history = self.history or []


def train(args, rt: Runtime, model: MiniMindForCausalLM, dataset, collate, *, trainable: list,
          save: Callable[[torch.nn.Module], Path], trainable_state: Callable[[torch.nn.Module], dict],
          load_trainable_state: Callable[[torch.nn.Module, dict], None], eval_dataset=None,
          plan: tuple = ("", "")) -> TrainState:
    """Train `trainable` parameters of `model` on `dataset`; `save(model)` writes the result and returns its path.
    trainable: parameters, or optimizer param groups whose `lr_ratio` scales the schedule's lr (LoRA+).
    trainable_state/load_trainable_state carry what a resume checkpoint needs of the model. plan: (what the data
    is, what trains), printed with the step count before the first step."""
    if len(dataset) < args.batch_size * rt.world_size:
        raise TrainError(f"{args.data_path}: {len(dataset)} samples, fewer than one global batch "
                         f"(--batch_size {args.batch_size} x {rt.world_size} processes); lower --batch_size")
    skeleton = None
    if rt.fsdp:  # fully_shard moves each layer's shards to the device: the whole model never sits there at once
        skeleton = distributed.meta_copy(model) if rt.is_main else None  # rank 0 saves the full weights through it
        trainable = distributed.shard(model, rt.device, DTYPES[args.dtype], trainable)
    else:
        model.to(rt.device)
    optimizer = make_optimizer(model, trainable, args, rt)
    # group_size 1 is a plain shuffle: each batch is a random chunk of the permutation.
    packed = isinstance(dataset, PackedDataset)  # rows all max_seq_len long: a plain shuffle, nothing to group
    sampler = LengthGroupedBatchSampler(dataset, args.batch_size, seed=args.seed,
                                        group_size=64 if args.group_by_length and not packed else 1,
                                        rank=rt.rank, world_size=rt.world_size,
                                        lengths=np.full(len(dataset), args.max_seq_len) if packed else None)
    batches_per_epoch = len(sampler)
    steps_per_epoch = batches_per_epoch // args.accumulation_steps
    if args.epochs is None:  # train_lora's default: a small file gets as many passes as a useful run needs
        args.epochs = max(1, math.ceil(args.auto_epochs_steps / max(steps_per_epoch, 1)))
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps) if total_steps else args.max_steps
    if total_steps == 0:
        raise TrainError(f"{args.data_path}: one epoch is {batches_per_epoch} batches, fewer than "
                         f"--accumulation_steps {args.accumulation_steps}; lower it or --batch_size")
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, total_steps // 50)
    schedule = wsd_lr if args.lr_schedule == "wsd" else cosine_lr
    # A short run logs more often, so its loss curve has points to show.
    log_every = args.log_interval if total_steps >= 20 * args.log_interval else max(1, total_steps // 20)
    if rt.is_main:
        print(f"plan: {plan[0]}; {args.epochs} epochs x {steps_per_epoch} steps = {total_steps} optimizer steps "
              f"(batch {args.batch_size} x {args.accumulation_steps} accumulation x {rt.world_size} processes)"
              + (f"; {plan[1]}" if plan[1] else ""), flush=True)
        if total_steps < MIN_USEFUL_STEPS:
            print(f"warning: {total_steps} optimizer steps are too few to learn much (fewer than {MIN_USEFUL_STEPS}); "
                  f"raise --epochs (one epoch is {steps_per_epoch} steps) or lower --batch_size", flush=True)

    state = TrainState()
    resume_path = Path(args.save_dir) / "checkpoints" / f"{args.save_weight}_{args.hidden_size}_resume.pth"
    resume_folder = resume_path.with_name(resume_path.stem + "_fsdp")  # sharded: one folder, not one file
    if args.from_resume and rt.fsdp:
        state = _load_resume_fsdp(resume_folder, resume_path, rt, model, optimizer, args)
    elif args.from_resume:
        state = _load_resume(resume_path, rt, model, optimizer, load_trainable_state, args)

    net = model
    if args.use_compile:
        net = torch.compile(net)
    if rt.world_size > 1 and not rt.fsdp:  # fully_shard wrapped the model in place
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)

    wandb_run = _start_wandb(args, rt, state) if args.use_wandb and rt.is_main else None
    bar = None
    if rt.is_main:
        from tqdm import tqdm
        # A terminal gets a live bar; a log file gets one plain line per log interval instead.
        bar = tqdm(total=total_steps, initial=state.step, desc=args.save_weight, dynamic_ncols=True,
                   mininterval=1.0, disable=not sys.stderr.isatty())
    run_start, run_start_step = time.time(), state.step

    def save_all():
        meta = {"scaler": rt.scaler.state_dict() if rt.scaler else None,
                "step": state.step, "epoch": state.epoch, "batches_in_epoch": state.batches_in_epoch,
                "tokens_seen": state.tokens_seen, "history": state.history,
                "world_size": rt.world_size, "batch_size": args.batch_size,
                "accumulation_steps": args.accumulation_steps, "rng": rng_state(),
                "pack": args.pack, "max_seq_len": args.max_seq_len, "replay": replay_key(args),
                "optimizer_name": args.optimizer,
                "wandb_id": getattr(wandb_run, "id", None)}
        if rt.fsdp:  # every rank: gather for the weights file, write its own shards of the resume state
            path = distributed.save_full(model, skeleton, save)
            distributed.save_resume(resume_folder, model, optimizer, meta)
            restore_rng(meta["rng"])  # saving must not move the RNG that a resumed run restores
            return path
        path = save(model)
        atomic_torch_save({"model": trainable_state(model), "optimizer": optimizer.state_dict(), **meta},
                          resume_path)
        return path

    running_loss = torch.zeros((), device=rt.device)  # summed on the device; read only at log points
    last_log_time, last_log_tokens, last_log_step = time.time(), state.tokens_seen, state.step
    last_good_save = None
    model.train()
    try:
        while state.step < total_steps and state.epoch < args.epochs:
            if hasattr(dataset, "set_epoch"):  # packed rows and replay draws change per epoch
                dataset.set_epoch(state.epoch)
            sampler.set_epoch(state.epoch)
            # Its own generator: starting the iterator would otherwise draw from the global RNG that resume restores,
            # shifting every later dropout mask of a resumed run.
            loader = DataLoader(dataset, batch_sampler=list(sampler)[state.batches_in_epoch:], collate_fn=collate,
                                num_workers=args.num_workers, pin_memory=rt.device.type == "cuda",
                                generator=torch.Generator().manual_seed(args.seed + state.epoch))
            group = []
            for batch in loader:
                group.append(batch)
                if len(group) < args.accumulation_steps:
                    continue
                lr = schedule(state.step, total_steps, args.learning_rate, warmup)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_ratio", 1.0)
                loss = _optimizer_step(net, optimizer, group, rt, args, parameters(trainable))
                running_loss += loss
                state.step += 1
                state.batches_in_epoch += len(group)
                state.tokens_seen += sum(int((b["input_ids"] != collate.pad_id).sum()) for b in group) * rt.world_size
                group = []
                is_last = state.step >= total_steps
                if state.step % log_every == 0 or is_last:
                    mean_loss = _checked_loss(running_loss, rt, state, last_good_save) / (state.step - last_log_step)
                    now = time.time()
                    tok_s = (state.tokens_seen - last_log_tokens) / max(now - last_log_time, 1e-9)
                    state.history.append({"step": state.step, "loss": mean_loss, "lr": lr, "tokens_per_sec": tok_s})
                    if bar is not None:
                        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                        bar.update(state.step - bar.n)
                        if bar.disable:
                            eta = (now - run_start) / (state.step - run_start_step) * (total_steps - state.step)
                            print(f"{args.save_weight} step {state.step}/{total_steps} loss {mean_loss:.4f} "
                                  f"lr {lr:.2e} {tok_s:,.0f} tokens/s eta {eta / 60:.1f} min", flush=True)
                    if wandb_run is not None:
                        wandb_run.log({"loss": mean_loss, "lr": lr, "tokens_per_sec": tok_s,
                                       "tokens_seen": state.tokens_seen}, step=state.step)
                    running_loss.zero_()
                    last_log_time, last_log_tokens, last_log_step = now, state.tokens_seen, state.step
                if eval_dataset is not None and args.eval_interval and state.step % args.eval_interval == 0:
                    _log_eval(model, eval_dataset, collate, args, rt, state, bar, wandb_run)
                if state.step % args.save_interval == 0 or is_last:
                    if state.step != last_log_step:  # never save weights whose loss was not checked
                        _checked_loss(running_loss, rt, state, last_good_save)
                    if rt.is_main or rt.fsdp:
                        last_good_save = save_all()
                    _barrier(rt)
                if is_last:
                    break
            else:
                state.epoch += 1
                state.batches_in_epoch = 0
                continue
            break
        if eval_dataset is not None:
            _log_eval(model, eval_dataset, collate, args, rt, state, bar, wandb_run)
    finally:
        if bar is not None:
            bar.close()
        if wandb_run is not None:
            wandb_run.finish()
    return state


def newton_schulz_float32(grad: torch.Tensor, ns_coefficients: tuple, ns_steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation (its quintic Newton-Schulz iteration, its coefficients) in float32. torch
    runs it in bfloat16, which a CPU without bfloat16 units multiplies 6x slower than float32: 8-30x slower steps."""
    a, b, c = ns_coefficients
    wide = grad.size(0) <= grad.size(1)
    x = grad.float() if wide else grad.float().T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.T


@contextlib.contextmanager
def muon_in_float32():
    """Swap torch's bfloat16 orthogonalisation for newton_schulz_float32 while Muon steps (on CPU); where a torch
    version lacks the function, its own runs."""
    import torch.optim._muon as muon_module
    original = getattr(muon_module, "_zeropower_via_newtonschulz", None)
    if original is None:
        yield
        return
    muon_module._zeropower_via_newtonschulz = newton_schulz_float32
    try:
        yield
    finally:
        muon_module._zeropower_via_newtonschulz = original


class MuonAndAdamW:
    """torch.optim.Muon for the hidden matrices and AdamW for the rest, stepped together: the loop's one optimizer
    (param_groups for the schedule, step, zero_grad, state_dict for resume). float32: orthogonalise in float32."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: Optional[torch.optim.Optimizer], float32: bool = False):
        self.optimizers = [muon] + ([adamw] if adamw else [])
        self.float32 = float32

    @property
    def param_groups(self) -> list:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        with muon_in_float32() if self.float32 else contextlib.nullcontext():
            for o in self.optimizers:
                o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"parts": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("parts", ())) != len(self.optimizers):
            raise ValueError("the saved optimizer state has other parts than this run's")
        for o, part in zip(self.optimizers, state["parts"]):
            o.load_state_dict(part)


def make_optimizer(model, trainable: list, args, rt: Runtime):
    """AdamW over what trains, or (--optimizer muon) Muon on its 2-D matrices, as nanochat and modded-nanoGPT do:
    Muon orthogonalises each matrix's momentum. Embeddings (and the lm_head tied to them) stay on AdamW."""
    if args.optimizer == "adamw":
        # foreach, not fused, over sharded parameters: the path FSDP2's own recipes use.
        return torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay,
                                 fused=rt.device.type == "cuda" and not rt.fsdp)
    if rt.fsdp:
        raise TrainError("--optimizer muon with --fsdp 1 is not supported (Muon needs each whole matrix); use DDP "
                         "(--fsdp 0) or --optimizer adamw")
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    muon, adamw = [], []
    for g in (trainable if isinstance(trainable[0], dict) else [{"params": trainable}]):
        rest = {k: v for k, v in g.items() if k != "params"}
        mats = [p for p in g["params"] if p.ndim == 2 and id(p) not in embeddings]
        others = [p for p in g["params"] if p.ndim != 2 or id(p) in embeddings]
        muon += [{**rest, "params": mats}] if mats else []
        adamw += [{**rest, "params": others}] if others else []
    if not muon:
        raise TrainError("--optimizer muon: nothing that trains is a 2-D matrix; use --optimizer adamw")
    # match_rms_adamw scales each update to AdamW's size, so one --learning_rate serves both.
    return MuonAndAdamW(torch.optim.Muon(muon, lr=args.learning_rate, weight_decay=args.weight_decay,
                                         adjust_lr_fn="match_rms_adamw"),
                        torch.optim.AdamW(adamw, lr=args.learning_rate, weight_decay=args.weight_decay) if adamw
                        else None, float32=rt.device.type == "cpu")


def parameters(trainable: list) -> list:
    """The parameters of a list of parameters or of optimizer param groups."""
    return [p for g in trainable for p in (g["params"] if isinstance(g, dict) else [g])]


def _optimizer_step(net, optimizer, group, rt: Runtime, args, trainable) -> torch.Tensor:
    """Forward/backward over the micro-batches of one step; returns the step's loss as a device tensor."""
    n_targets = torch.tensor(float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in group)), device=rt.device)
    if rt.world_size > 1:
        dist.all_reduce(n_targets)  # async on the device: no host sync
    n_targets = n_targets.clamp(min=1)  # a step whose samples all lost their answers to truncation adds 0, not 0/0
    step_loss = torch.zeros((), device=rt.device)
    # DDP averages gradients over ranks, hence a world_size factor; FSDP here sums them (see trainer/distributed.py).
    factor = rt.world_size if not rt.fsdp else 1
    for i, batch in enumerate(group):
        input_ids = batch["input_ids"].to(rt.device, non_blocking=True)
        labels = batch["labels"].to(rt.device, non_blocking=True)
        n_micro = (labels[:, 1:] != -100).sum()
        sync = i == len(group) - 1 or rt.world_size == 1 or rt.fsdp
        with (contextlib.nullcontext() if sync else net.no_sync()), rt.autocast:
            # loss = token mean of this micro-batch; re-weight it to a share of the global token mean.
            loss = net(input_ids, labels=labels).loss * n_micro / n_targets * factor
        (rt.scaler.scale(loss) if rt.scaler else loss).backward()
        step_loss += loss.detach() / factor
    if rt.scaler:
        rt.scaler.unscale_(optimizer)
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
    if rt.scaler:
        rt.scaler.step(optimizer)
        rt.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def _global_mean(t: torch.Tensor, rt: Runtime) -> float:
    t = t.detach().clone()
    if rt.world_size > 1:
        dist.all_reduce(t)
    return t.item()


def _checked_loss(running_loss, rt, state, last_good_save) -> float:
    """The summed loss since the last log point, read from the device; a non-finite one stops the run."""
    value = _global_mean(running_loss, rt)
    if not math.isfinite(value):
        raise NonFiniteLoss(f"step {state.step}: loss is {value}; stopped without saving. "
                            + (f"Last good checkpoint: {last_good_save}. " if last_good_save else "")
                            + "Lower --learning_rate, check the data, or train in float32.")
    return value


def _barrier(rt):
    if rt.world_size > 1:
        dist.barrier()


@torch.no_grad()
def evaluate_loss(model, dataset, collate, batch_size: int, device, max_batches: int = 0, autocast=None) -> float:
    """Token-mean loss over (the first max_batches batches of) a dataset, in order."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    # Its own generator: a held-out score between steps must not move the global RNG that dropout draws from.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        labels = batch["labels"].to(device)
        n = (labels[:, 1:] != -100).sum()
        with autocast or contextlib.nullcontext():
            total += model(batch["input_ids"].to(device), labels=labels).loss.float() * n
        count += n
    model.train(was_training)
    return (total / count.clamp(min=1)).item()


def _log_eval(model, eval_dataset, collate, args, rt, state, bar, wandb_run):
    if not rt.is_main and not rt.fsdp:  # a sharded model's forward needs every rank
        return
    loss = evaluate_loss(model, eval_dataset, collate, args.batch_size, rt.device, args.eval_batches, rt.autocast)
    if not rt.is_main:
        return
    msg = f"step {state.step}: eval loss {loss:.4f}, ppl {math.exp(min(loss, 50)):.2f}"
    (bar.write if bar is not None else print)(msg)
    state.history.append({"step": state.step, "eval_loss": loss})
    if wandb_run is not None:
        wandb_run.log({"eval_loss": loss}, step=state.step)


RESUME_KEYS = ("model", "optimizer", "scaler", "step", "epoch", "batches_in_epoch", "tokens_seen", "history",
               "world_size", "batch_size", "accumulation_steps", "rng")


START_OVER = "delete it and start again without --from_resume"


def _no_resume(path: Path, other: Path, other_flag: str):
    if other.exists():
        return TrainError(f"--from_resume 1: no resume checkpoint at {path}, but {other} was saved {other_flag}; "
                          f"resume {other_flag} too")
    return TrainError(f"--from_resume 1: no resume checkpoint at {path}; start without --from_resume "
                      f"(or with the same --save_dir/--save_weight/--hidden_size as the run to continue)")


def _check_resume_fits(ckpt, path: Path, rt: Runtime, args, keys=RESUME_KEYS) -> None:
    missing = [k for k in keys if k not in ckpt] if isinstance(ckpt, dict) else ["model"]
    if missing:
        raise TrainError(f"{path}: not a resume checkpoint (no {missing[0]!r} entry); {START_OVER}")
    if rt.fsdp and ckpt["world_size"] != rt.world_size:  # the saved data position counts batches per rank
        raise TrainError(f"{path}: saved by {ckpt['world_size']} processes, this run has {rt.world_size}; resume "
                         f"with {ckpt['world_size']} processes in all (torchrun --nnodes x --nproc_per_node), or "
                         f"{START_OVER}")
    same = (ckpt["world_size"], ckpt["batch_size"], ckpt["accumulation_steps"]) == (
        rt.world_size, args.batch_size, args.accumulation_steps)
    if not same:
        raise TrainError(f"{path}: saved with {ckpt['world_size']} processes x --batch_size {ckpt['batch_size']} x "
                         f"--accumulation_steps {ckpt['accumulation_steps']}; resume with the same values")
    layout = (ckpt.get("pack", args.pack), ckpt.get("max_seq_len", args.max_seq_len))  # absent before 2026-11-28
    if layout != (args.pack, args.max_seq_len):  # the saved data position counts rows of that layout
        raise TrainError(f"{path}: saved with --pack {layout[0]} --max_seq_len {layout[1]}; resume with the same "
                         f"values")
    if ckpt.get("optimizer_name", "adamw") != args.optimizer:  # absent before --optimizer: AdamW's
        raise TrainError(f"{path}: saved with --optimizer {ckpt.get('optimizer_name', 'adamw')}; resume with it, or "
                         f"{START_OVER}")
    saved_replay = ckpt.get("replay", replay_key(args))
    if list(saved_replay) != list(replay_key(args)):  # and batches of that mix
        raise TrainError(f"{path}: saved with --replay_data {saved_replay[0]} --replay_ratio {saved_replay[1]:g}; "
                         f"resume with the same values")


def _resumed(ckpt, path: Path, rt: Runtime, args) -> TrainState:
    args.wandb_id = ckpt.get("wandb_id")
    if rt.is_main:
        print(f"resumed from {path} at step {ckpt['step']}")
    return TrainState(step=ckpt["step"], epoch=ckpt["epoch"], batches_in_epoch=ckpt["batches_in_epoch"],
                      tokens_seen=ckpt["tokens_seen"], history=list(ckpt["history"]))


def _load_resume(path: Path, rt: Runtime, model, optimizer, load_trainable_state, args) -> TrainState:
    if not path.is_file():
        raise _no_resume(path, path.with_name(path.stem + "_fsdp"), "with --fsdp 1")
    start_over = START_OVER
    ckpt = safe_torch_load(path, hint=start_over)
    _check_resume_fits(ckpt, path, rt, args)
    try:
        load_trainable_state(model, ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if rt.scaler and ckpt["scaler"]:
            rt.scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"])
    except (CheckpointError, ValueError, KeyError, TypeError) as e:
        reason = " ".join(str(e).split())
        raise TrainError(f"{path}: does not fit this run ({reason}); resume with the flags of the run that saved "
                         f"it, or {start_over}") from None
    model.to(rt.device)
    return _resumed(ckpt, path, rt, args)


def _load_resume_fsdp(folder: Path, single_file: Path, rt: Runtime, model, optimizer, args) -> TrainState:
    """--from_resume under --fsdp: the sharded folder's meta is checked like the .pth, then every rank loads its
    shards of model and optimizer state."""
    found = distributed.find_resume(folder)
    if found is None:
        raise _no_resume(folder, single_file, "without --fsdp")
    ckpt = distributed.read_meta(found, START_OVER)
    _check_resume_fits(ckpt, found, rt, args, keys=tuple(k for k in RESUME_KEYS if k not in ("model", "optimizer")))
    try:
        distributed.load_resume(found, model, optimizer)
        restore_rng(ckpt["rng_per_rank"][rt.rank])
    except (RuntimeError, ValueError, KeyError) as e:  # DCP names the first key or shape that does not fit
        reason = " ".join(str(e).split())[:300]
        raise TrainError(f"{found}: does not fit this run ({reason}); resume with the flags of the run that saved "
                         f"it, or {START_OVER}") from None
    return _resumed(ckpt, found, rt, args)


def _start_wandb(args, rt, state):
    import wandb  # only when asked for
    run_id = getattr(args, "wandb_id", None)
    return wandb.init(project=args.wandb_project, name=f"{args.save_weight}_{args.hidden_size}",
                      config=vars(args), id=run_id, resume="allow" if run_id else None)


def plot_loss(history, path: Path, title: str) -> Optional[Path]:
    """Training (and eval) loss against step, as a PNG beside the weights."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train_pts = [(h["step"], h["loss"]) for h in history if "loss" in h]
    eval_pts = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train_pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(*zip(*train_pts), "o-" if len(train_pts) < 30 else "-", label="train loss")  # a short run's points show
    if eval_pts:
        ax.plot(*zip(*eval_pts), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def load_full_state(model, state_dict: dict) -> None:
    """Resume of full-parameter training: every weight comes from the checkpoint."""
    load_state_dict_strict(model, state_dict, "its weights")


def fit_full(args, dataset_cls) -> "TrainState":
    """fit() for full-parameter training (pretrain, full SFT): every weight trains; {save_weight}_{h}.pth is saved."""
    trained_on = {"trained_on": {"stage": args.save_weight, "data_path": str(Path(args.data_path).resolve())}}
    return fit(args, dataset_cls, prepare_model=lambda model: (list(model.parameters()), "every weight"),
               save=lambda model: save_model(model, weight_path(args.save_dir, args.save_weight, args.hidden_size),
                                             extra_config=trained_on),
               trainable_state=lambda model: model.state_dict(), load_trainable_state=load_full_state)


def cleanup(rt: Optional[Runtime]) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def run_main(main_fn, argv=None) -> int:
    """Run a trainer's main; bad input and failed runs print one line instead of a traceback."""
    try:
        main_fn(argv)
        return 0
    except SystemExit as e:  # argparse: --help, or a refused flag (already printed)
        return e.code if isinstance(e.code, int) else 2
    except (TrainError, DataError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup(None)


def fit(args, dataset_cls, prepare_model: Callable, save: Callable, trainable_state: Callable,
        load_trainable_state: Callable) -> TrainState:
    """What every trainer does around the loop: runtime, tokenizer, data, model, train, plot, report.
    prepare_model(model) -> (list of trainable parameters, a few words on what trains) (applies LoRA, for
    train_lora)."""
    from model.tokenizer import Tokenizer
    if args.max_seq_len < 2:
        raise TrainError(f"--max_seq_len {args.max_seq_len}: a sample needs at least 2 tokens (one to read, one to "
                         f"predict); raise --max_seq_len")
    rt = setup_runtime(args)
    tokenizer = Tokenizer()
    doc_length = 1 << 30 if args.pack else args.max_seq_len  # packed texts stay whole; rows are cut at max_seq_len
    dataset = dataset_cls(args.data_path, tokenizer, doc_length, skip_bad_lines=args.skip_bad_lines)
    if args.skip_bad_lines and dataset.n_skipped and rt.is_main:
        print(f"{args.data_path}: skipped {dataset.n_skipped} malformed lines")
    dataset.check_targets()
    eval_dataset = dataset_cls(args.eval_data_path, tokenizer, args.max_seq_len) if args.eval_data_path else None
    if eval_dataset is not None:
        eval_dataset.check_targets()
    model = init_model(args, tokenizer.vocab_size)
    data_plan = f"{len(dataset)} samples of {Path(args.data_path).name}"
    args.replay_path = replay_file(args, model)
    if args.replay_path:
        replay = SFTDataset(args.replay_path, tokenizer, args.max_seq_len)
        pool, left_out = replay_pool(replay, base_replies(model, tokenizer, dataset))
        dataset = ReplayMix(dataset, replay, args.replay_ratio, seed=args.seed, pool=pool)
        dataset.check_targets()
        data_plan += (f" + {dataset.n_replay} replay samples per epoch from {args.replay_path} ({left_out} of its "
                      f"{len(replay)} left out: they repeat a base reply this data replaces)")
    elif getattr(args, "replay_data", None) == "auto":
        data_plan += (" (no replay: the base's .json names no chat data it was trained on that is still there; "
                      "pass --replay_data FILE to keep its general answers)")
    elif getattr(args, "replay_data", None) is not None:
        data_plan += " (no replay)"
    if not args.pack:
        checked, cut, no_target = dataset.cut_counts()
        of = "" if checked == len(dataset) else f" of the first {checked}"
        data_plan += f"; --max_seq_len {args.max_seq_len} cuts {cut}{of} samples"
        if no_target:
            data_plan += f", {no_target} of them before their first answer token (no loss from them)"
    else:
        dataset = PackedDataset(dataset, args.max_seq_len, seed=args.seed)
        data_plan += f", packed into {len(dataset)} rows of {args.max_seq_len} tokens"
    trainable, what_trains = prepare_model(model)
    collate = PadCollator(tokenizer.pad_token_id)
    n_train = sum(p.numel() for p in parameters(trainable))
    model_plan = (f"{what_trains + ', ' if what_trains else ''}{n_train / 1e6:.3f}M of "
                  f"{model.num_parameters() / 1e6:.2f}M parameters train, device {rt.device}")
    t0 = time.time()
    state = train(args, rt, model, dataset, collate, trainable=trainable, save=save,
                  trainable_state=trainable_state, load_trainable_state=load_trainable_state,
                  eval_dataset=eval_dataset, plan=(data_plan, model_plan))
    if rt.is_main:
        elapsed = time.time() - t0
        plot = plot_loss(state.history, Path(args.save_dir) / f"{args.save_weight}_{args.hidden_size}_loss.png",
                         f"{args.save_weight} (hidden {args.hidden_size})")
        last = next((h["loss"] for h in reversed(state.history) if "loss" in h), float("nan"))
        print(f"{args.save_weight}: {state.step} steps in {elapsed:.0f}s, final loss {last:.4f}, "
              f"{state.tokens_seen / max(elapsed, 1e-9):,.0f} tokens/s" + (f"; loss curve {plot}" if plot else ""))
    return state


def replay_file(args, model) -> Optional[str]:
    """--replay_data: a chat file, 'none', or 'auto': the chat data the base was trained on, as its sidecar
    records it (train_full_sft writes it), when that file is still there."""
    choice = getattr(args, "replay_data", None)
    if choice in (None, "none", ""):
        return None
    if choice != "auto":
        if not Path(choice).is_file():
            raise TrainError(f"--replay_data {choice}: no such file; pass a chat jsonl of general conversations, "
                             f"or --replay_data none")
        return choice
    recorded = (read_sidecar(getattr(model, "name_or_path", None)).get("trained_on") or {}).get("data_path")
    if not recorded or not Path(recorded).is_file() or not is_chat_file(recorded):
        return None
    return recorded


REPLAY_SCAN = 200_000  # replay rows examined (and drawn from): plenty to keep a base's general answers


@torch.no_grad()
def base_replies(model, tokenizer, task, limit=512, max_new_tokens=32) -> set:
    """First sentences of the base's greedy replies to the task's prompts (at most `limit`, spread over the file)
    that the task's answers replace (a persona's "I am MiniMind, ...", the generic advice a remedy replaces):
    replaying rows that say them would teach the old answer back. A reply the task itself gives (a general
    question answered as the base answers it) is not replaced, and rows that say it stay in the replay."""
    prompts, answers = [], []
    for i in evenly_spaced(len(task), limit):
        messages = task.record(i)["conversations"]
        last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(tokenizer.apply_chat_template(messages[:last], add_generation_prompt=True, tokenize=True))
        answers.append(messages[last]["content"])
    model.eval()
    replies = []
    for b in range(0, len(prompts), 32):  # left-padded batches; the mask hides the pads
        batch = prompts[b: b + 32]
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(batch):
            ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
        out = model.generate(ids, max_new_tokens, temperature=0, eos_token_id=tokenizer.eos_token_id,
                             attention_mask=mask)[:, width:].tolist()
        for row in out:
            row = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
            replies.append(first_sentence(tokenizer.decode(row, skip_special_tokens=True)))
    model.train()
    said = "\n".join(answers)  # first sentences hold no newline, so none matches across two answers
    return {r for r in replies if len(r) >= 6 and r not in said}  # "4." or "Yes." would strike half the file


def evenly_spaced(n: int, k: int) -> list:
    """At most k indices of range(n), evenly spaced, first and last included."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int)).tolist() if n else []


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[。！？!?])|(?<=\.)\s|\n", text.strip(), maxsplit=1)[0].strip()


def replay_pool(replay, replaced: set) -> tuple:
    """(indices of the replay rows that may be drawn, how many were left out): rows whose replies contain one of
    the `replaced` sentences are left out; at most REPLAY_SCAN rows are examined."""
    keep, left_out = [], 0
    for i in range(min(len(replay), REPLAY_SCAN)):
        answers = [m["content"] for m in replay.record(i)["conversations"] if m["role"] == "assistant"]
        if any(s in a for s in replaced for a in answers):
            left_out += 1
        else:
            keep.append(i)
    return keep, left_out


def read_sidecar(weight) -> dict:
    from model.checkpoint import config_path
    try:
        d = json.loads(config_path(weight).read_text(encoding="utf-8")) if weight else {}
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}

