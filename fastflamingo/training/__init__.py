"""Fine-tuning: the Flamingo recipe (frozen vision encoder and LM; the resampler, the gated
cross-attention layers and the added tokens' embedding rows train) in one loop, with what keeps a
big model in little memory: a 4- or 8-bit frozen LM (build or load the model with
``quantization=``), activation checkpointing, gradient accumulation, an 8-bit AdamW
(bitsandbytes), and checkpoints of what training changes only.

Gradient accumulation weighs each micro-batch by its share of the step's target tokens, so a step
of ``grad_accum`` micro-batches gives the gradient of one batch of them all (the LM loss is a
mean over tokens: equal weights would not). Checkpoints (``out/checkpoint.pt``, loaded with
``weights_only=True``) hold the trainable weights, the optimizer and the schedule; with data
given as a function of the step (:class:`~fastflamingo.training.data.DocumentBatches`), a resumed
run equals the uninterrupted one. ``out/model`` is ``save_pretrained(trainable_only=True)``: it
loads onto the base weights (``Flamingo.from_pretrained(out/"model", lang_encoder=...)``).
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings

import torch
from tqdm.auto import tqdm

from ..warn import InputWarning
from .data import Document, DocumentBatches, HeldOut, collate, load_documents
from .masters import Masters

OPTIMIZERS = ("adamw", "adamw8bit")
TRAIN = ("flamingo", "all")
CHECKPOINT = "checkpoint.pt"

__all__ = ["Document", "DocumentBatches", "HeldOut", "collate", "fine_tune", "load_documents", "schedule"]


def schedule(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """The learning rate's factor at ``step``: linear warm-up over ``warmup`` steps, then a cosine
    decay to ``floor`` at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def _optimizer(model, name: str, lr: float, weight_decay: float, train: str, masters: Masters):
    groups = masters.groups(model.parameter_groups(weight_decay) if train == "flamingo" else
                            [{"params": [p for p in model.parameters() if p.requires_grad],
                              "weight_decay": weight_decay}])
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    from ..quant import _bnb
    return _bnb('optimizer="adamw8bit"').optim.AdamW8bit(groups, lr=lr)


def _trained_rows(model, params: dict[str, torch.Tensor], train: str, shard: bool) -> dict[str, int]:
    """name -> first trained row of each partly trained embedding matrix (the Flamingo recipe
    with ``config.num_base_tokens``): the optimizer steps a copy of those rows only
    (:mod:`~fastflamingo.training.masters`). Not under ``shard=True``: FSDP2 shards the matrix
    whole (its optimizer steps it whole; the frozen rows' moments stay 0 in AdamW)."""
    from ..tokens import embedding_matrices
    base = model.config.num_base_tokens
    if train != "flamingo" or not base or shard:
        return {}
    names = {id(p): n for n, p in params.items()}
    return {names[id(w)]: base for w in embedding_matrices(model) if id(w) in names and base < w.shape[0]}


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def fine_tune(model, batches, *, steps: int, lr: float = 1e-4, weight_decay: float = 0.1, warmup: int = 0,
              max_grad_norm: float | None = 1.0, optimizer: str = "adamw", train: str = "flamingo",
              activation_checkpointing: bool = False, shard: bool = False, out: str | None = None,
              save_every: int = 0, resume: bool = False, progress: bool | None = None,
              on_step=None, eval_data=None, eval_every: int = 0) -> list[dict]:
    """Train ``model`` for ``steps`` optimizer steps; returns every step's record (loss, learning
    rate, target tokens, seconds).

    Args:
        model: a :class:`~fastflamingo.Flamingo` (its LM may be quantized: it stays frozen). Its
            trained weights may be float32 or bfloat16: bfloat16 ones step as float32 master
            copies (:mod:`~fastflamingo.training.masters`: 10 bytes per trained value besides
            the optimizer's state, 8 in float32), and their gradients add up in float32.
            float16 is refused (its gradients need loss scaling). The added tokens' embedding
            rows (``config.num_base_tokens``) step as a float32 copy of those rows alone.
        batches: ``batches(step)`` -> the step's micro-batches, each ``(vision_x or None, input_ids,
            attention_mask, labels)`` (:class:`~fastflamingo.training.data.DocumentBatches`: an
            epoch leaves out the ``len(docs) % (batch_size x grad_accum x world_size)`` documents
            left over, other ones each epoch, with a warning; a resumed run must give the
            checkpoint's seed, batch_size, grad_accum, world_size and number of documents).
        steps: optimizer steps in all (a resumed run continues to this many). A resumed run may
            change it (extend a finished run, or end sooner): the schedule is then the one of the
            new ``steps``, from the first resumed step on (its rate at that step, not the old
            run's; the steps already made keep the rates they had).
        lr, weight_decay, warmup: AdamW's; the rate warms up linearly over ``warmup`` steps, then
            decays along a cosine to 10% (:func:`schedule`). Weight decay spares norms, gates,
            latents and embeddings (:meth:`~fastflamingo.Flamingo.parameter_groups`). A resumed
            run must give the checkpoint's (and its ``optimizer``): another one is an error
            naming both, not silently the checkpoint's.
        max_grad_norm: clip the trainable parameters' gradient norm to this (> 0; None: no
            clipping). A resumed run must give the checkpoint's.
        optimizer: ``"adamw"`` (torch) or ``"adamw8bit"`` (bitsandbytes: its two moments in 8
            bits, ~75% less optimizer memory).
        train: ``"flamingo"``: the Flamingo recipe (:meth:`~fastflamingo.Flamingo.set_trainable`);
            ``"all"``: every weight but the vision encoder's (a model whose LM is not pretrained;
            the vision encoder stays frozen, as in Flamingo: it runs under ``torch.no_grad``).
        activation_checkpointing: recompute activations in the backward
            (:meth:`~fastflamingo.Flamingo.activation_checkpointing_enable`).
        shard: FSDP2 data parallel over the initialized ``torch.distributed`` group
            (:func:`fastflamingo.distribute.shard`): every rank calls this with its own
            ``batches`` (``DocumentBatches(..., rank=, world_size=)``); the step weighs the
            micro-batches of all ranks by their target tokens, so it is the step one process makes
            with all of them. Rank 0 writes the checkpoints.
        out: a directory for checkpoints (``checkpoint.pt``, ``model/``) and ``history.json``.
        save_every: also checkpoint every this many steps (0: at the end only).
        resume: continue from ``out``'s checkpoint (the same ``lr``, ``weight_decay``,
            ``warmup``, ``optimizer``, ``max_grad_norm`` and ``DocumentBatches`` settings: another
            one is an error naming both values; ``steps`` may change, see above).
        progress: a tqdm bar; None: when stderr is a terminal.
        on_step: called with each step's record (the dict ``history`` gets) once the step is made
            (and checkpointed, when it is a checkpoint's): for logs where no bar shows (the
            command line's ``--log-every``), or a tracker. Under ``shard=True`` every rank calls it.
        eval_data: held-out documents (:class:`~fastflamingo.training.data.HeldOut`, or any
            iterable of micro-batches as ``batches`` gives them): their loss, the mean over all
            their target tokens (in eval mode, no gradient), goes into the record of every
            ``eval_every``-th step and of the last (``"eval_loss"``), before that step's
            checkpoint. Under ``shard=True`` every rank gives its ``HeldOut(..., rank=,
            world_size=)``: the loss is over all of them.
        eval_every: evaluate every this many steps (0: at the last step only).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        # clip_grad_norm_ scales by max_grad_norm / norm: a negative one flips every gradient (gradient ascent)
        raise ValueError(f"max_grad_norm must be > 0 (the norm to clip the gradients to) or None (no clipping), "
                         f"got {max_grad_norm}")
    if eval_every < 0 or (eval_every and eval_data is None):
        raise ValueError(f"eval_every={eval_every}: it must be >= 0, and it needs eval_data (held-out documents)")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if train not in TRAIN:
        raise ValueError(f"train must be one of {TRAIN}, got {train!r}")
    if resume and out is None:
        raise ValueError("resume=True continues from out's checkpoint: pass out")
    if not resume and out is not None and os.path.isfile(os.path.join(out, CHECKPOINT)):
        raise FileExistsError(f"out={out!r} holds an earlier run's checkpoint ({CHECKPOINT}): a new run would overwrite "
                              "it, its model/ and history.json. resume=True (--resume) continues that run; to start "
                              "over, remove the directory or give another out")
    if shard and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("shard=True trains data parallel over torch.distributed: initialize it first "
                         "(torch.distributed.init_process_group, e.g. under torchrun)")
    if shard and optimizer != "adamw":
        raise ValueError(f"shard=True takes optimizer='adamw': bitsandbytes' {optimizer} keeps no sharded state")
    if train == "flamingo":
        model.set_trainable()
    else:
        from ..quant import quantized_modules
        if quantized_modules(model):
            raise ValueError(f"train='all' trains every weight, but {len(quantized_modules(model))} layer(s) hold "
                             "4/8-bit weights, which do not train: load the model without quantization, or "
                             "train='flamingo' (the frozen LM may stay quantized)")
        model.set_trainable(train_embeddings=False)  # no masks on the embedding rows: all of them train
        model.requires_grad_(True)
        model.vision_encoder.requires_grad_(False)  # it runs under no_grad (encode_vision): it would never move
    if activation_checkpointing:
        model.activation_checkpointing_enable()
    if shard:
        from ..distribute import shard as fully_shard_model
        fully_shard_model(model)
    world = torch.distributed.get_world_size() if shard else 1
    params = _trainable(model)
    if not params:
        raise ValueError("the model has no trainable parameter (no resampler or cross-attention layers?)")
    from ..distribute import offload_message, offloaded_trainable
    if offloaded := offloaded_trainable(model):
        raise ValueError(f"fine_tune: {offload_message(offloaded)}")
    _check_trained_dtypes(params, shard)
    # float32 copies of bfloat16 trained weights and of the added tokens' embedding rows: the optimizer steps them
    masters = Masters(params, _trained_rows(model, params, train, shard))
    settings = {"lr": lr, "weight_decay": weight_decay, "warmup": warmup, "optimizer": optimizer, "steps": steps,
                "max_grad_norm": max_grad_norm, **_model_settings(model, params)}
    for name, source in (("batches", batches), ("eval_data", eval_data)):
        if shard and isinstance(source, (DocumentBatches, HeldOut)) and \
                (source.rank, source.world_size) != (torch.distributed.get_rank(), world):
            raise ValueError(f"{name} is rank {source.rank} of world_size {source.world_size}, but this process is "
                             f"rank {torch.distributed.get_rank()} of {world}: build it with "
                             "rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size() "
                             "(else every rank takes the same documents)")
    if isinstance(batches, DocumentBatches):
        settings.update(batches.settings())  # the data order: a resume with others reads other documents
        batches.check(model)  # every document's images, tokens and length, before the first step (not at step 900)
    if isinstance(eval_data, HeldOut):
        eval_data.check(model)
    elif eval_data is not None:
        _check_eval_data(eval_data)
    opt = _optimizer(model, optimizer, lr, weight_decay, train, masters)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, steps, warmup))
    history, start = [], 0
    if resume:
        path = os.path.join(out, CHECKPOINT)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resume=True: no checkpoint {path!r}")
        from ..convert.io import read_checkpoint_file
        state = read_checkpoint_file(path)  # (a truncated or corrupt copy: the run's own saves are atomic)
        _check_settings(path, state, settings)  # before any weight is overwritten
        if state["step"] >= steps:
            raise ValueError(f"the checkpoint in {out} is at step {state['step']}, not before steps={steps}: "
                             "nothing to do")
        start, history = _load(path, state, model, params, masters, opt, sched, shard)
        # the rate of the first resumed step from this run's schedule (steps may differ from the
        # checkpoint's): the optimizer's restored rate is the old schedule's
        # (base_lr * factor, as LambdaLR computes it: an unchanged run's rate, bit for bit)
        for group, base in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base * schedule(start, steps, warmup)
        sched._last_lr = [group["lr"] for group in opt.param_groups]
    model.train()
    device = model.device
    bar = tqdm(range(start, steps), desc="fine-tuning", initial=start, total=steps,
               disable=None if progress is None else not progress)
    with masters:  # (its hooks move each 16-bit gradient to the float32 copy as the backward makes it)
        for step in bar:
            t0 = time.perf_counter()
            micro = batches(step)  # moved to the device one micro-batch at a time
            counts = [int((mb[3][:, 1:] != -100).sum()) for mb in micro]
            total = sum(counts)
            if shard:  # every rank's targets: the step's mean is over all of them
                t = torch.tensor(total, device=device)
                torch.distributed.all_reduce(t)
                total = int(t)
            if total == 0:
                raise ValueError(f"step {step}'s batch has no target token (every label is -100)")
            loss_sum = torch.zeros((), device=device)
            for (vx, ids, mask, labels), n in zip(micro, counts):
                if shard and vx is None:
                    raise ValueError("under shard=True every micro-batch needs vision_x (a zero image that no token "
                                     "sees will do: FSDP2 needs every rank to run the same modules); "
                                     "DocumentBatches(..., world_size=...) adds one")
                if n == 0 and not shard:  # (a rank with nothing to learn still runs, for the collectives)
                    continue
                output = _forward(model, vx, ids, mask, labels if n else None, device, shard)
                # no target (the LM's mean loss would be 0/0 = nan): zero gradients, the same collectives
                loss = output.logits.float().sum() * 0.0 if n == 0 else output.loss * (n * world / total)
                loss.backward()
                loss_sum += loss.detach().float()  # read once a step: no host sync per micro-batch
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(masters.stepped_params(), max_grad_norm)
            if shard:  # FSDP2 averaged the gradients over the ranks (hence the world in the weights); the loss too
                torch.distributed.all_reduce(loss_sum)
            rate, loss_sum = opt.param_groups[0]["lr"], loss_sum.item() / world
            if not math.isfinite(loss_sum):  # before the step: the weights (and any checkpoint) stay finite
                raise FloatingPointError(
                    f"step {step + 1}'s loss is {loss_sum}: the trained weights are left as they were after step "
                    f"{step} (the last checkpoint in out is untouched). Lower lr, or set max_grad_norm; a "
                    "bfloat16 model that overflows may train in float32")
            opt.step()
            masters.write_back()
            sched.step()
            opt.zero_grad(set_to_none=True)
            history.append({"step": step + 1, "loss": loss_sum, "lr": rate,
                            "tokens": total, "seconds": time.perf_counter() - t0})
            if eval_data is not None and ((eval_every and (step + 1) % eval_every == 0) or step + 1 == steps):
                try:
                    history[-1]["eval_loss"] = _held_out_loss(model, eval_data, device, shard)
                except Exception:
                    if out is not None and not shard:  # the step is kept: resume once eval_data is mended
                        _save(out, model, params, masters, opt, sched, step + 1, history, shard, settings)
                    raise
            bar.set_postfix(loss=f"{loss_sum:.4f}", refresh=False)
            if out is not None and ((save_every and (step + 1) % save_every == 0) or step + 1 == steps):
                _save(out, model, params, masters, opt, sched, step + 1, history, shard, settings)
            if on_step is not None:
                on_step(history[-1])
    model.eval()
    return history


def _forward(model, vx, ids, mask, labels, device, shard: bool):
    """The model's output for one micro-batch, moved to ``device`` (``labels`` None: no loss)."""
    vx = None if vx is None else vx.to(device, model.vision_encoder_dtype)
    with warnings.catch_warnings():
        if shard:  # the zero image that keeps a text-only batch on the vision path
            warnings.filterwarnings("ignore", message=".*is seen by no token", category=InputWarning)
        return model(vx, ids.to(device), attention_mask=mask.to(device),
                     labels=None if labels is None else labels.to(device))


def _check_eval_data(eval_data) -> None:
    """``eval_data`` other than a HeldOut: something iterated again at every evaluation (not an
    iterator, which the first would use up), of ``(vision_x or None, input_ids, attention_mask,
    labels)`` micro-batches."""
    if iter(eval_data) is eval_data:
        raise ValueError(f"eval_data is an iterator ({type(eval_data).__name__}): the first evaluation would use it "
                         "up. Give a list of micro-batches, or HeldOut(documents, tokenizer, media_token_id)")
    for i, mb in enumerate(eval_data):
        if not (isinstance(mb, (tuple, list)) and len(mb) == 4 and torch.is_tensor(mb[1]) and torch.is_tensor(mb[3])):
            what = "a Document: wrap the documents in HeldOut(documents, tokenizer, media_token_id)" \
                if isinstance(mb, Document) else f"a {type(mb).__name__}"
            raise ValueError(f"eval_data[{i}] is {what}; eval_data holds (vision_x or None, input_ids, "
                             "attention_mask, labels) micro-batches, as batches(step) gives them")


@torch.no_grad()
def _held_out_loss(model, eval_data, device, shard: bool) -> float:
    """The mean LM loss over every target token of ``eval_data``'s micro-batches (over all ranks'
    under ``shard``), in eval mode."""
    model.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    try:
        for vx, ids, mask, labels in eval_data:
            n = int((labels[:, 1:] != -100).sum())
            output = _forward(model, vx, ids, mask, labels if n else None, device, shard)
            if n:  # (else a rank's padding batch: the same forward, for the collectives)
                total += output.loss.double() * n
                count += n
    finally:
        model.train()
    if shard:
        both = torch.stack([total, torch.tensor(float(count), device=device, dtype=torch.float64)])
        torch.distributed.all_reduce(both)
        total, count = both[0], int(both[1])
    if count == 0:
        raise ValueError("eval_data has no target token (every label is -100)")
    return float(total) / count


def _check_trained_dtypes(params: dict[str, torch.Tensor], shard: bool) -> None:
    """float32 or bfloat16 trained weights (bfloat16 ones train through float32 copies, which
    FSDP2's state dicts do not know: shard=True takes float32 ones)."""
    half = [n for n, p in params.items() if p.dtype == torch.float16]
    if half:
        raise ValueError(f"{len(half)} trained weights are float16 (e.g. {half[0]}): float16 gradients underflow "
                         "without loss scaling, which fine_tune does not do. Load the model in bfloat16 "
                         "(dtype=torch.bfloat16, --dtype bfloat16: its trained weights get float32 master copies) "
                         "or float32 (dtype=torch.float32, --dtype float32; quantization='nf4' keeps the frozen LM small)")
    other = sorted({str(p.dtype) for p in params.values()} - {"torch.float32", "torch.bfloat16"})
    if other:
        raise ValueError(f"trained weights must be float32 or bfloat16, got {', '.join(other)}")
    bf16 = [n for n, p in params.items() if p.dtype == torch.bfloat16]
    if shard and bf16:
        raise ValueError(f"shard=True with bfloat16 trained weights (e.g. {bf16[0]}): their float32 master copies are not "
                         "in FSDP2's optimizer state dict. Load the model in float32 (dtype=torch.float32, --dtype float32) "
                         "to train sharded")


def _save(out: str, model, params, masters: Masters, opt, sched, step: int, history: list[dict], shard: bool,
          settings: dict) -> None:
    from ..convert.pretrained import trainable_keys
    from ..distribute import gather_state
    # collectives first (every rank), then rank 0 writes
    saved = gather_state(model, trainable_keys(model))  # the trainable weights and the embeddings
    trainable = masters.state({n: saved[n] for n in params})  # (float32 copies: a resume continues exactly)
    rng = _rng_states(shard)  # (dropout draws on: a resumed run draws what the uninterrupted one would)
    if shard:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        optim = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if torch.distributed.get_rank() != 0:
            torch.distributed.barrier()
            return
    else:
        optim = opt.state_dict()
    os.makedirs(out, exist_ok=True)
    state = {"step": step, "trainable": trainable, "optimizer": optim, "scheduler": sched.state_dict(),
             "history": history, "settings": settings, "rng": rng}
    tmp = os.path.join(out, CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(out, CHECKPOINT))  # a run killed while saving keeps the last checkpoint
    model.save_pretrained(os.path.join(out, "model"), trainable_only=True, state=saved)
    with open(os.path.join(out, "history.json"), "w") as f:
        json.dump(history, f)
    if shard:
        torch.distributed.barrier()


_FLAGS = {"lr": "lr (--lr)", "weight_decay": "weight_decay (--weight-decay)", "warmup": "warmup (--warmup)",
          "optimizer": "optimizer (--optimizer)", "max_grad_norm": "max_grad_norm (--max-grad-norm)",
          # DocumentBatches': which documents each step takes
          "seed": "seed (--seed)", "batch_size": "batch_size (--batch-size)", "grad_accum": "grad_accum (--grad-accum)",
          "world_size": "world_size (torchrun --nproc-per-node)", "documents": "documents (in --data)",
          # the model trained: another dtype or quantization computes other steps
          "dtype": "the trained weights' dtype (--dtype)", "quantization": "the LM's quantization (--quantization)"}


def _model_settings(model, params: dict[str, torch.Tensor]) -> dict:
    """The trained weights' dtype(s) and the LM's quantization (layers' kinds), which a resume
    must keep."""
    from ..quant import int8_modules, quantized_modules
    quantized, int8 = len(quantized_modules(model)), len(int8_modules(model))
    kinds = [k for k, n in (("nf4", quantized - int8), ("int8", int8)) if n]
    return {"dtype": "+".join(sorted({str(p.dtype).removeprefix("torch.") for p in params.values()})),
            "quantization": "+".join(kinds) or None}


def _check_settings(path: str, state: dict, settings: dict) -> None:
    """A resumed run trains on with the checkpoint's lr, weight decay, warm-up, optimizer and
    max_grad_norm, and with its DocumentBatches' seed, batch_size, grad_accum, world_size and
    number of documents, or not at all: restoring the optimizer's state would otherwise keep the
    old ones silently, and other data settings read other documents than the uninterrupted run.
    A setting the checkpoint does not hold is not checked: one written before the settings were
    saved holds its lr and weight decay in the scheduler's and optimizer's states (its warm-up is
    unknown); one written before max_grad_norm and the data settings were, or with data that is
    not a DocumentBatches (nor data that is one now), has no data settings."""
    saved = dict(state.get("settings") or {})
    if "lr" not in saved and state.get("scheduler", {}).get("base_lrs"):
        saved["lr"] = state["scheduler"]["base_lrs"][0]
    if "weight_decay" not in saved and state.get("optimizer", {}).get("param_groups"):
        saved["weight_decay"] = max(g.get("weight_decay", 0.0) for g in state["optimizer"]["param_groups"])
    changed = [f"{_FLAGS[k]} {saved[k]!r} -> {settings[k]!r}" for k in _FLAGS
               if k in saved and k in settings and saved[k] != settings[k]]
    if changed:
        raise ValueError(f"resume: the checkpoint {path} was trained with other settings: {'; '.join(changed)}; "
                         "resume with the checkpoint's, or start a new run in another out directory "
                         "(steps may change on resume)")


def _load(path: str, state: dict, model, params, masters: Masters, opt, sched,
          shard: bool) -> tuple[int, list[dict]]:
    from ..convert.pretrained import VISION_PREFIX
    missing = sorted(params.keys() - state["trainable"].keys())
    # (a train="all" checkpoint written before the vision encoder stayed frozen holds its weights: unchanged ones)
    extra = sorted(k for k in state["trainable"].keys() - params.keys() if not k.startswith(VISION_PREFIX))
    if missing or extra:
        raise ValueError(f"the checkpoint {path} is of another set of trainable weights: "
                         f"missing {missing[:3]}, unexpected {extra[:3]} (another model, or train=...)")
    if shard:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, state["trainable"], options=options)
        set_optimizer_state_dict(model, opt, state["optimizer"], options=options)
    else:
        masters.load(state["trainable"])
        opt.load_state_dict(_fit_optimizer_state(path, state["optimizer"], opt, masters))
    sched.load_state_dict(state["scheduler"])
    if state.get("rng") is not None:  # (a checkpoint written before it was saved: none)
        mine = state["rng"][torch.distributed.get_rank() if shard else 0]
        torch.set_rng_state(mine["cpu"])
        if mine.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["cuda"])
    return state["step"], state["history"]


def _rng_states(shard: bool) -> list[dict]:
    """Every rank's random number generators' states (one process: one), which dropout draws from:
    saved with the checkpoint and restored on resume."""
    mine = {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []}
    if not shard:
        return [mine]
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, mine)
    return states


MOMENTS = ("exp_avg", "exp_avg_sq", "state1", "state2")  # per-value optimizer state: torch's AdamW, bitsandbytes'


def _fit_optimizer_state(path: str, saved: dict, opt, masters: Masters) -> dict:
    """The checkpoint's optimizer state, checked value for value against what the optimizer
    steps. A checkpoint written before the added tokens' embedding rows stepped as a copy of
    their own holds torch AdamW's moments for the whole matrix: their trained rows are taken
    (the frozen rows' moments are 0). Any other mismatch is an error naming the parameter."""
    stepped = [p for g in opt.param_groups for p in g["params"]]
    indices = [i for g in saved["param_groups"] for i in g["params"]]
    if len(indices) != len(stepped):  # (torch's load_state_dict says so too, less plainly)
        raise ValueError(f"the checkpoint {path} holds optimizer state for {len(indices)} parameters, this run "
                         f"steps {len(stepped)}: another model, train=..., or a checkpoint of another version")
    first = {id(masters.copies[n]): f for n, f in masters.first.items()}
    names = {id(masters.stepped(p)): n for n, p in masters.params.items()}
    fitted = dict(saved["state"])
    for i, p in zip(indices, stepped):
        entry = saved["state"].get(i)
        if entry is None:
            continue
        inner = entry.get("__bnb_optimizer_quant_state__", entry)
        for key in MOMENTS:
            value = inner.get(key)
            if not isinstance(value, torch.Tensor) or value.numel() == p.numel():
                continue
            if key.startswith("exp_avg") and id(p) in first and value.shape[1:] == p.shape[1:] \
                    and value.shape[0] - first[id(p)] == p.shape[0]:
                entry = fitted[i] = {**entry, key: value[first[id(p)]:].clone()}
                continue
            raise ValueError(f"the checkpoint {path} holds optimizer state {key} of {value.numel()} values for "
                             f"{names.get(id(p), 'a parameter')}, which steps {p.numel()}: a checkpoint of another "
                             "model or version (an 8-bit AdamW one from before the added tokens' rows stepped "
                             "alone); start a new run")
    return {**saved, "state": fitted}

