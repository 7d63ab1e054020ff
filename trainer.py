"""The training machinery of every ALLO stage: one resumable loop, the per-batch losses, the cached
reference log-probs. It knows no stage and no task: a stage hands fit() a model, its masks, a
function that builds micro-batch i and a function that turns a micro-batch into its loss.

Under torchrun (bookkeeping/parallel.py) each of N processes takes its contiguous --batch-size
share of a global micro-batch of N x --batch-size examples, and every loss is normalized over the
whole optimizer step (Norms), so N processes at batch b train exactly like one process at batch N*b.
"""

import math
from contextlib import nullcontext
from dataclasses import astuple, dataclass

import torch

import allo
from bookkeeping import parallel
from bookkeeping.flags import count, real, setting
from bookkeeping.optim import masked_adamw
from bookkeeping.runs import Interrupted, UsageError
from bookkeeping.trainlog import TrainLog
from data import batches, collate, pack
from model import HEAD_CHUNK, autocast


def seed_setting():
    """The pipeline seed, declared once for every config that draws with it (training, sampling)."""
    return setting(0, "seed of the init, the batch order and the sampling (a pipeline seed)", type=int)


@dataclass(frozen=True)
class TrainConfig:
    """optimization (every training stage)"""
    batch_size: int = setting(16, "examples (or pairs) per micro-batch and process", type=count(1),
                              per_process=True)
    grad_accum: int = setting(1, "micro-batches per optimizer step", type=count(1))
    weight_decay: float = setting(0.0, "AdamW weight decay, on parameters with >= 2 dims", type=real(0))
    lr_warmup_frac: float = setting(0.1, "linear learning-rate warmup over this fraction of the steps, "
                                    "then cosine decay to 0", type=real(0, 1))
    max_len: int = setting(128, "max tokens of prompt + response", type=count(2))
    ref_batch_size: int = setting(64, "rows per batch of the reference log-prob pass (no gradient), at the "
                                  "start of dpo, forget and learn", type=count(1), result=False)
    ref_cache: str = setting(None, "folder where reference log-prob passes are kept by content and reused by "
                             "later stages, reruns and study arms (train.py's default: <run>/cache; 'off': "
                             "none)", result=False)
    log_every: int = setting(50, "a progress line every N steps", type=count(1), result=False)
    ckpt_every: int = setting(100, "a checkpoint every N steps", type=count(1), result=False)
    ckpt_minutes: float = setting(0.0, "and at most one checkpoint per this many minutes, the first too "
                                  "counted from the start (0: no limit): a crash loses about this much at "
                                  "most, and short stages and fast steps are not slowed by writes",
                                  type=real(0), result=False)
    pack: bool = setting(False, "pack several sequences into each row (block-diagonal attention): the "
                         "padding of rows of unequal length is not computed, and rows with the same prompt "
                         "(a preference pair) hold it once; equal to padded rows up to float rounding")
    grad_checkpoint: bool = setting(False, "keep only each block's input, recompute the rest in backward "
                                    "(less activation memory, one more forward pass)", result=False)
    compile: bool = setting(False, "torch.compile the model's forward in training (faster steps on a GPU "
                            "after tens of seconds of compiling; agrees with eager within float rounding)",
                            result=False)
    seed: int = seed_setting()


@dataclass(frozen=True)
class PreferenceConfig:
    """the preference losses (dpo, mask, forget, learn)"""
    beta: float = setting(0.1, "beta of DPO and NPO", type=real(0, open_low=True))
    nll: float = setting(0.0, "weight of an NLL term on the chosen response (RPO-style; dpo and learn)",
                         type=real(0), variant=True)
    epochs: float = setting(0.0, "dpo, forget and learn train this many passes over their data, their "
                            "steps following from its size and the global batch (the release: 1); 0: "
                            "their --*-steps", type=real(0))


@dataclass
class Norms:
    """The denominators of one optimizer step's loss, and the step-mean protocol, written here once.
    A micro-batch carries its own counts (Norms(pairs=...)); Norms.of_step sums them over the step's
    micro-batches on every process; each per-batch loss is "sum over my rows / step total" with these
    totals, so the micro-batch losses of every process add up to the mean over the whole step (and
    N processes at batch b train as one process at batch N*b). DDP averages the processes' gradients:
    backward() multiplies each share by the number of processes to undo that."""
    pairs: int = 0  # DPO: preference pairs
    chosen_tokens: int = 0  # DPO's optional NLL term: response targets of the chosen side
    rejected_tokens: int = 0  # DPO: response targets of the rejected side (the kept share's denominator)
    scored_tokens: int = 0  # SFT: response targets
    weighted_tokens: int = 0  # NPO: targets with w_t != 0

    @classmethod
    def of_step(cls, norms, device):
        """The Norms of a step: this process's micro-batches summed, then summed over processes
        (on the host when there is one process: the counts are the host's already)."""
        if parallel.world() == 1:
            return cls(*map(sum, zip(*map(astuple, norms))))
        total = torch.tensor([astuple(n) for n in norms], device=device).sum(0)
        return cls(*parallel.all_reduce_sum(total).tolist())


# ----------------------------------------------------------------------------- the loop

def fit(stage, model, masks, batch_at, loss_fn, out, *, steps, lr, cfg):
    """Train `model` for `steps` optimizer steps with MaskedAdamW on `masks` (all-True masks train
    every parameter) and return it.

    batch_at(i) -> micro-batch i of this process, a dict with "attention_mask" and "norms";
    loss_fn(net, batch, norms, stats) -> that micro-batch's share of the loss of the step; it may
    put into the dict `stats` its shares of the step's statistics (DPO's rewards, NPO's log-ratio),
    which add up over micro-batches and processes as the loss does and go to metrics.jsonl with it.
    Dense gradients are clipped to norm 1.0 before the masked update (as the release); the
    learning rate warms up linearly, then decays on a cosine. The metrics rows, progress lines and
    checkpoints of the steps go through a TrainLog (bookkeeping/trainlog.py), which also resumes
    from the last checkpoint when the stage runs again. A non-finite loss (all-reduced, so every
    process sees it) or non-finite weights stop every process with a UsageError.
    """
    device = next(model.parameters()).device
    model.grad_checkpointing = cfg.grad_checkpoint
    own_memory(model, masks)
    opt = masked_adamw(model.named_parameters(), masks, device, lr=lr, weight_decay=cfg.weight_decay)
    log = TrainLog(stage, out, steps, cfg.log_every, cfg.ckpt_every, cfg.ckpt_minutes)
    start = log.resume(model, opt)
    net = parallel.wrap(model)  # DDP under torchrun: gradients all-reduced; `opt` and `log` use `model`
    if cfg.compile:
        net = torch.compile(net)  # compiled on the first batch, again when a new shape needs it
    try:
        for step in range(start, steps):
            lr_now = lr * lr_factor(step, steps, cfg.lr_warmup_frac)
            micro = [batch_at(step * cfg.grad_accum + j) for j in range(cfg.grad_accum)]  # this process's
            if cfg.pack:  # several sequences a row: the matrix products skip the padding
                micro = [packed(b, cfg.max_len) for b in micro]
            loss, tokens, stats = optimizer_step(model, net, opt, micro, loss_fn, lr_now)
            log.step(step + 1, loss, lr_now, tokens, model, opt, stats)
    except NonFinite as e:
        raise UsageError(e.worded(stage, step + 1, log.last_good())) from None
    except KeyboardInterrupt:  # Ctrl-C: one line, and where a rerun resumes
        raise Interrupted(f"{stage}: interrupted; rerun the same command to resume from step "
                          f"{log.last_step()}") from None
    return model


def own_memory(model, masks):
    """Give each parameter that `masks` names, on a CPU, memory of its own. A float32 checkpoint's
    tensors come from safetensors as copy-on-write pages of the file's mapping (Transformer.
    from_pretrained keeps them: a frozen model reads them in place), so the first update would fault
    the pages in one at a time: SmolLM2-135M-Instruct's first optimizer step took 1.2-4.8 s that way
    on 2 CPU cores, the next ones 0.2 s, and this copy takes 0.2 s. The values are copied bit for
    bit."""
    for name, p in model.named_parameters():
        if name in masks and p.device.type == "cpu":
            p.data = p.data.clone()  # fresh anonymous pages, written once here


class NonFinite(ArithmeticError):
    """A step's loss (what="loss") or its updated weights (what="weights", value: the first
    parameter's name) are not finite."""

    def __init__(self, what, value):
        super().__init__(what, value)
        self.what, self.value = what, value

    def worded(self, stage, step, last_good):
        """The one line a user reads: what, at which step, and where a rerun resumes."""
        if self.what == "loss":
            return (f"{stage}: loss is {self.value} at step {step}; stopped, {last_good} (too high a "
                    "learning rate, or the data or starting weights out of range?)")
        return (f"{stage}: non-finite weights after step {step} (the first in {self.value}: the update "
                f"overflowed); stopped, {last_good}")


def optimizer_step(model, net, opt, micro_batches, loss_fn, lr):
    """One optimizer step at learning rate lr: the gradients of the micro-batches through `net`
    (the model, or its DDP or compiled wrapper), clipped to norm 1.0, the masked update of
    `model`; NonFinite on a non-finite loss or weights. Returns the step's loss, its real tokens
    and its statistics (a dict), summed over every process.

    The step's one host synchronisation reads the loss, the tokens, the statistics and whether
    every trained weight is finite together, after the update (on a GPU nothing before it waits
    for the device): a non-finite loss has then made the weights in memory non-finite too, but the
    stage stops before any checkpoint or output holds them, and the loss is named first."""
    model.train()
    for g in opt.param_groups:
        g["lr"] = lr
    sums, names = backward(net, micro_batches, loss_fn, next(model.parameters()).device)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    trained = [p for p in model.parameters() if p in opt.state]
    step_loss, step_tokens, *values, finite = torch.cat([sums, finite_flag(trained).to(sums)]).tolist()
    # (values: the statistics, in `names` order)
    if not math.isfinite(step_loss):
        raise NonFinite("loss", step_loss)
    if not finite:  # the first non-finite parameter, named (only here: the step has failed)
        raise NonFinite("weights", next(n for n, p in model.named_parameters()
                                        if p in opt.state and not finite_flag([p]).item()))
    return step_loss, step_tokens, dict(zip(names, values))


def backward(net, batches, loss_fn, device):
    """The gradients of one optimizer step, from this process's micro-batches; returns the step's
    [loss, real tokens, statistics...] summed over every process, a float64 tensor on `device`
    (not read here), and the statistics' names."""
    norms = Norms.of_step([b["norms"] for b in batches], device)
    sums = torch.tensor([0.0, sum(int(b["attention_mask"].sum()) for b in batches)],
                        dtype=torch.float64, device=device)  # [loss share, tokens] of this process
    stats = {}  # each statistic's share, summed over the micro-batches
    no_sync = getattr(net, "no_sync", None)  # DDP's (also through a compiled wrapper)
    for j, b in enumerate(batches):
        # DDP all-reduces the gradients once, after the step's last micro-batch
        with nullcontext() if no_sync is None or j == len(batches) - 1 else no_sync():
            mine = {}
            loss = loss_fn(net, b, norms, mine)
            (loss * parallel.world()).backward()  # DDP averages over processes: the loss is a share
        sums[0] += loss.detach()
        for name, value in mine.items():
            stats[name] = stats.get(name, 0.0) + value
    names = sorted(stats)
    sums = torch.cat([sums, torch.stack([stats[n] for n in names]).to(sums)]) if names else sums
    return parallel.all_reduce_sum(sums), names


def finite_flag(tensors):
    """1.0 when every entry of `tensors` is finite, else 0.0, as a 1-element tensor on their device
    (not read here). A tensor is finite when its least and largest entries are: min and max carry
    a NaN through, an infinity is one of them. On a GPU the largest |x| of each tensor, one
    multi-tensor op; on a CPU each tensor's aminmax, a vectorized pass, where torch's inf-norm takes
    a slow one (SmolLM2-135M's weights: 220 ms against 24 ms, 2 cores; 6% of an SFT step)."""
    if not tensors:
        return torch.ones(1)
    if tensors[0].device.type == "cpu":
        bounds = torch.stack([torch.stack(torch.aminmax(t)) for t in tensors])
    else:
        bounds = torch.stack(torch._foreach_norm(tensors, float("inf")))
    return bounds.isfinite().all().float()[None]


PACK_WHEN = 0.9  # packed rows are used when they hold at most this share of the padded positions


def packed(batch, capacity):
    """The batch with its packed rows (data.pack into rows of `capacity`: the padding left out, a
    prompt shared by several rows and a prefix shared by all held once) where they save at least a
    tenth of the padded positions; as it is where they do not: the wider rows' attention and its
    explicit mask then cost more than the padding saved (tools/bench_train.py --pack: a 135M
    model's SFT step 0.8x as fast packed into 7% more positions, DPO 1.2x with 8% fewer, before
    pairs shared their prompts)."""
    rows = pack(batch, capacity)
    if rows["input_ids"].numel() > PACK_WHEN * batch["input_ids"].numel():
        return batch
    return {**batch, "packed": rows}


def lr_factor(step, n_steps, warmup_frac):
    """Linear warmup over warmup_frac of the steps, then cosine decay to 0 (the release's schedule)."""
    warm = max(1, int(warmup_frac * n_steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, n_steps - warm)))


def batch_indices(n, batch, i, seed):
    """Example indices of micro-batch i: epoch e = a fixed permutation from (seed, e), so the batch
    order is a function of (seed, step) and a resumed run sees what an uninterrupted one sees."""
    batch = min(batch, n)
    per_epoch = n // batch
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + i // per_epoch))
    k = i % per_epoch
    return perm[k * batch:(k + 1) * batch].tolist()


def stage_steps(steps, epochs, n, cfg):
    """A stage's optimizer steps: `steps`, or with epochs > 0 that many passes over its n examples as
    batch_indices lays them out (n // global micro-batch micro-batches an epoch), at least one."""
    if not epochs:
        return steps
    per_epoch = n // min(n, cfg.batch_size * parallel.world())
    return max(1, math.ceil(epochs * per_epoch / cfg.grad_accum))


def rank_batch(n, i, cfg):
    """This process's example indices of micro-batch i: its contiguous slice of the global
    micro-batch batch_indices(n, cfg.batch_size * world, i, cfg.seed), so N processes at batch b
    see exactly what one process sees at batch N * b."""
    if n < parallel.world():
        raise UsageError(f"{n} examples cannot be shared by {parallel.world()} processes")
    idx = batch_indices(n, cfg.batch_size * parallel.world(), i, cfg.seed)
    return idx[parallel.shard(len(idx))]


# ----------------------------------------------------------------------------- masks

def full_masks(model):
    """All-True masks: MaskedAdamW then trains every parameter, at AdamW's cost."""
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- per-batch losses

def scored_logps(model, batch, device):
    """The log-probs [N] of the batch's N scored targets, those targets [N] and where they are (their
    flat indices into the rows run, on `device`); the forward under autocast(device), from the
    batch's padded rows or, where it has them, its packed rows (batch["packed"], data.pack; in their
    order). The targets and their places are found on the host, where collate made the batch, so
    the forward never waits on the device (a bool mask on the device would, to learn N). Up to
    model.HEAD_CHUNK logit entries the [N,V] logits are made whole and allo.token_logps reads them;
    beyond, the model computes the log-probs chunk by chunk (model.HeadLogps), never holding the
    batch's logits.

    collate() pads on the right, so causal attention alone gives every real position exactly the
    logits it has unpadded (padding only follows it): no attention mask is passed, which lets
    scaled_dot_product_attention use its fused kernels."""
    rows = batch.get("packed", batch)
    labels = rows["labels"].flatten()
    at = (labels != -100).nonzero().squeeze(1)  # on the host: no wait for the device
    chunked = len(at) * unwrapped(model).cfg.vocab_size > HEAD_CHUNK
    targets, at = labels[at].to(device), at.to(device)
    tree = {k: rows[k].to(device) for k in ("doc_ids", "branch_ids", "positions") if k in rows}
    with autocast(device):
        out = model(rows["input_ids"].to(device), keep=at, targets=targets if chunked else None, **tree)
    return (out if chunked else allo.token_logps(out, targets)), targets, at


def unwrapped(net):
    """The Transformer inside a DDP (.module) or compiled (._orig_mod) wrapper, or a stand-in
    (.model, tools/memory_plan.py)."""
    while not hasattr(net, "cfg"):
        net = next(getattr(net, a) for a in ("module", "_orig_mod", "model") if hasattr(net, a))
    return net


def forward_logps(model, batch, device):
    """Per-token log-probs [B,T] of the batch's labels (0 off-target), padded or packed alike."""
    logps, _, at = scored_logps(model, batch, device)
    shape = batch["labels"].shape
    if "packed" in batch:  # at: places in the packed rows; source: each packed place's in [B,T]
        at = batch["packed"]["source"].to(device).flatten().index_select(0, at)
    return logps.new_zeros(shape.numel()).scatter(0, at, logps).view(shape)


def sft_batch_loss(model, b, norms, device):
    """SFT (the starting point, and the rewriter): cross-entropy of the micro-batch's response
    tokens, its share of the mean over the step's scored tokens."""
    logps, targets, _ = scored_logps(model, b, device)
    return allo.nll_loss(logps, targets, normalizer=norms.scored_tokens)


def dpo_batch_loss(model, b, norms, device, beta, eps, nll=0.0, stats=None):
    """DPO with key tokens on a micro-batch of pairs, rows [chosen; rejected] [2B,T]: its share of
    the mean over the step's pairs, plus nll x the NLL of the chosen tokens over the step's chosen
    tokens (RPO-style, optional). eps < 1: the rejected side counts through its ceil(eps * T) key
    tokens (the learn stage); eps 1 is vanilla DPO (the dpo stage).
    stats (a dict): receives the batch's shares of the step's DPO numbers, as the DPO authors'
    trainer and TRL log them: the mean chosen and rejected rewards beta * sum_t r_t, the reward
    accuracy (share of pairs with chosen > rejected) and margin, and the share of the rejected
    side's tokens kept as key tokens."""
    logps = forward_logps(model, b, device)  # [2B,T]
    (pc, pr), (rc, rr) = logps.chunk(2), b["ref"].to(device).chunk(2)
    rejected = b["labels"].chunk(2)[1].to(device) != -100
    keep = allo.key_token_mask((pr - rr).detach(), rejected, eps)
    losses, chosen_reward, rejected_reward = allo.dpo_loss(pc, pr, rc, rr, beta, keep)
    if stats is not None:  # shares of the step's means, as the loss is
        stats.update(reward_chosen=chosen_reward.sum() / norms.pairs,
                     reward_rejected=rejected_reward.sum() / norms.pairs,
                     reward_accuracy=(chosen_reward > rejected_reward).sum() / norms.pairs,
                     reward_margin=(chosen_reward - rejected_reward).sum() / norms.pairs,
                     kept_share=(keep & rejected).sum() / max(norms.rejected_tokens, 1))
    loss = losses.sum() / norms.pairs
    return loss - nll * pc.sum() / norms.chosen_tokens if nll else loss


def npo_batch_loss(model, b, norms, device, beta, stats=None):
    """Token-level NPO (the forget stage) on the micro-batch's weighted tokens, its share of the mean over
    the step's weighted tokens. stats (a dict): receives the batch's shares of the weighted tokens'
    mean log-ratio r_t and of their share of the response tokens."""
    logps = forward_logps(model, b, device)  # [B,T]
    ref, weights = b["ref"].to(device), b["weights"].to(device)
    if stats is not None:
        weighted = weights != 0
        logratio = ((logps - ref).detach() * weighted).sum()
        stats.update(weighted_logratio=logratio / max(norms.weighted_tokens, 1),
                     weighted_share=weighted.sum() / max(norms.scored_tokens, 1))
    return allo.npo_token_loss(logps, ref, weights, beta, normalizer=norms.weighted_tokens)


def n_scored(labels):
    """Number of scored targets (labels != -100)."""
    return int((labels != -100).sum())


# ----------------------------------------------------------------------------- reference log-probs and pairs

@torch.no_grad()
def reference_logps(ref, tok, prompts, responses, max_len, device, batch_size=64,
                    label="reference log-probs", pack=False, all_processes=True):
    """Per-example 1-D tensors of the reference's per-token log-probs on the response targets,
    computed once and cached for the whole stage (no second model kept in memory during training).
    Each process computes its contiguous share of the examples; every process gets them all
    (all_processes False: this process alone computes them all, as eval.py on rank 0).
    pack: the rows run in the order of their prompts, so that the rows of one prompt (a pair's
    chosen and rejected, one question's samples) share a batch, and each batch runs packed where that
    pays (packed: no padding, a shared prompt held once); the log-probs are the padded pass's up to
    float rounding, returned in the rows' own order."""
    ref.eval()
    order = sorted(range(len(prompts)), key=prompts.__getitem__) if pack else list(range(len(prompts)))
    mine = order[parallel.shard(len(order))] if all_processes else order
    out = []
    for i in batches(label, len(mine), batch_size):
        rows = mine[i:i + batch_size]
        b = collate(tok, [prompts[r] for r in rows], [responses[r] for r in rows], max_len)
        scored = b["labels"] != -100
        if pack:
            b = packed(b, max_len)
        at = scored.flatten().nonzero().squeeze(1).to(device)  # found on the host: no wait for the device
        logps = forward_logps(ref, b, device).flatten().index_select(0, at)  # the rows' targets end to end
        out += logps.split(scored.sum(1).tolist())
    done = parallel.gather_rows(out, torch.float32, device) if all_processes else \
        [r.to("cpu", torch.float32) for r in out]  # in `order`
    return [done[k] for k in sorted(range(len(order)), key=order.__getitem__)]


def with_reference(batch, cached, rows):
    """Lay the cached per-token reference log-probs of `rows` onto the batch's label positions."""
    ref = torch.zeros(batch["labels"].shape)
    ref[batch["labels"] != -100] = torch.cat([cached[r] for r in rows])
    return {**batch, "ref": ref}


def pair_rows(pairs):
    """Preference pairs as rows (prompts, responses): chosen rows 0..n-1, then rejected rows n..2n-1."""
    return [p["prompt"] for p in pairs] * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]


def pair_batch(tok, rows, idx, cached, max_len):
    """Pairs idx as one batch, rows [chosen; rejected] [2B,T], with their cached reference log-probs
    and their Norms (pairs, chosen tokens). rows: (prompts, responses) as pair_rows lays them out,
    text or data.encode_rows' ids."""
    n = len(rows[0]) // 2
    pick = idx + [n + k for k in idx]
    b = collate(tok, [rows[0][k] for k in pick], [rows[1][k] for k in pick], max_len)
    b["norms"] = Norms(pairs=len(idx), chosen_tokens=n_scored(b["labels"][:len(idx)]),
                       rejected_tokens=n_scored(b["labels"][len(idx):]))
    return with_reference(b, cached, pick)
