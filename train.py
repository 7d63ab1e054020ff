"""ALLO stage by stage (Chen et al., EMNLP 2024, "Not Everything is All You Need").

    python train.py                  # every stage on the embedded default, then the results table
    python train.py --model DIR --questions train.jsonl --eval-questions val.jsonl test.jsonl --run-dir R
                                     # every stage on your model and questions, then the table
    python train.py --stage learn --model out/forget --data pairs.jsonl --mask learn.safetensors --out allo/
    torchrun --nproc_per_node 4 train.py --run-dir runs/ddp    # the same on 4 GPUs (or 4 CPU processes)

Stages (each reads the run directory, default runs/default/, as PIPELINE says, or its explicit flags):
  sft       the starting point: SFT of --model on the questions' reference solutions (or --sft-data;
            --skip-sft starts from --model as it is); on the embedded default, the task is written
            into <run>/task/ and a tiny Llama trained from scratch
  sample    the data: K self-sampled responses per question -> learning pairs (correct, wrong)
            and the forgetting set (every wrong response)
  dpo       key neurons locating, 1/2: vanilla DPO from the SFT model, every parameter; also the
            full-parameter DPO baseline
  mask      key neurons locating, 2/2: global top-k% of |theta_dpo - theta_sft| (or accumulated
            DPO gradients, --scorer grad): one mask for forgetting, one for learning
  rewriter  unaligned knowledge forgetting, 1/2: the token-level reward model (a rewriter that
            minimally corrects wrong responses); flags unaligned tokens p_t < tau
  forget    unaligned knowledge forgetting, 2/2: token-level NPO on the unaligned tokens, updating
            only the forgetting mask
  learn     alignment improving: DPO with key tokens on the rejected side, updating only the
            learning mask: the ALLO model
  all       every stage in order, skipping finished ones (--force redoes them), then eval.py's table

A stage writes into <out>.tmp/ and swaps it into <out> (default <run>/<stage>/: a complete Hugging
Face folder with the tokenizer's files, metrics.jsonl, stage.json) when it finishes; it writes only
into a folder of its own, and its reference log-probs into <run>/cache/ (--ref-cache), where a later
stage, rerun or study arm with the same reference model, rows and settings reads them back. Its
fingerprint (its config and its inputs' content) decides what happens when it runs again: finished
alike, it is skipped; with other settings, an error (--force redoes it). Training stages checkpoint
every --ckpt-every steps and resume from there when run again alike; the batch order is a function
of (seed, step), so a resumed run on CPU ends with the same weights as an uninterrupted one. Every
bad file or flag stops with one line and exit status 2, Ctrl-C with one line and 130; one process at
a time works on an output. <run>/run.json records the run's own inputs.

Under torchrun (bookkeeping/parallel.py; DistributedDataParallel, nccl on CUDA with one GPU per
process, gloo on CPU) N processes at --batch-size b train exactly like one process at batch N*b.
Reference log-probs, sampling and rewriter scoring are split over the processes too; rank 0 alone
writes files and prints. A checkpoint resumes under any number of processes with the same global
batch.
"""

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
from safetensors import SafetensorError

import allo
import lora
import task
from bookkeeping import flags, gguf_io, parallel
from bookkeeping.fileio import write_json, write_jsonl
from bookkeeping.flags import count, rate, real, setting
from bookkeeping.refcache import RefCache
from bookkeeping.resolve import HELD_OUT, drop_unused_record, load_record, stage_inputs, start_run
from bookkeeping.runs import (Interrupted, StageOutput, UsageError, check_lengths, load_masks, load_model,
                              one_line, writing)
from data import (DataError, PromptConfig, batches, collate, cut_at_stop, encode_rows, generate_ids,
                  is_correct, load_tokenizer, prompt_text, read_jsonl, reference_answers, response_lead)
from eval import ROWS, accuracy, evaluate_run, markdown_table
from model import ModelConfig, Transformer, autocast, pick_device
from trainer import (Norms, PreferenceConfig, TrainConfig, dpo_batch_loss, fit, full_masks, n_scored,
                     npo_batch_loss, pair_batch, pair_rows, rank_batch, reference_logps, seed_setting,
                     sft_batch_loss, stage_steps, with_reference)

# ----------------------------------------------------------------------------- sft

@dataclass(frozen=True)
class ArchConfig:
    """embedded model (sft without --model: a new Llama of this shape)"""
    dim: int = setting(128, "model width", type=count(1))
    n_layers: int = setting(4, "layers", type=count(1))
    n_heads: int = setting(4, "attention heads", type=count(1))
    n_kv_heads: int = setting(2, "key/value heads (grouped-query attention)", type=count(1))
    hidden_dim: int = setting(352, "SwiGLU hidden size", type=count(1))


@dataclass(frozen=True)
class SFTConfig:
    """sft: the starting point"""
    steps: int = setting(1000, "SFT optimizer steps", flag="--sft-steps", type=count(1))
    lr: float = setting(2e-3, "SFT peak learning rate", flag="--sft-lr", type=rate)
    eval_n: int = setting(200, "validation questions scored after SFT", type=count(0))
    arch: ArchConfig = ArchConfig()
    prompt: PromptConfig = PromptConfig()
    train: TrainConfig = TrainConfig()


def stage_sft(config, inputs, out, device, force=False):
    """The starting point: SFT of inputs["model"] (a checkpoint directory) or, without one, of a new
    Llama of shape config.arch, on inputs["data"]: questions rows, whose target is their reference
    solution under the prompt template, or {"input", "output"} rows. Validation: greedy accuracy on
    the first eval_n questions of inputs["eval_questions"]."""
    cfg, prompt = config.train, config.prompt
    with StageOutput("sft", out, config, inputs, device, force) as so:
        if so.finished:
            return so.info
        tok = load_tokenizer(inputs["tokenizer"])
        read = read_jsonl(inputs["data"], "sft", held=so.held)
        if not read:
            raise UsageError(f"{inputs['data']}: no SFT rows to train on")
        lead = response_lead(prompt.template)
        rows = [r if "input" in r else
                {"input": prompt_text(r["question"], prompt.template, tok, prompt.system),
                 "output": lead + r["answer"]} for r in read]
        prompts, targets = encode_rows(tok, [r["input"] for r in rows], [r["output"] for r in rows])
        check_lengths("sft", tok, prompts, targets, cfg.max_len, read.where)
        if inputs["model"]:
            policy = load_model(inputs["model"], device, tok)
        else:
            torch.manual_seed(cfg.seed)
            shape = ModelConfig(vocab_size=tok.vocab_size, max_seq_len=cfg.max_len, **vars(config.arch))
            policy = Transformer(shape).to(device)
        print(f"sft: {policy.num_params() / 1e6:.2f}M parameters, vocab {tok.vocab_size}, {len(rows)} "
              f"training examples, device {device}")

        def batch_at(i):
            idx = rank_batch(len(rows), i, cfg)
            b = collate(tok, [prompts[k] for k in idx], [targets[k] for k in idx], cfg.max_len)
            return {**b, "norms": Norms(scored_tokens=n_scored(b["labels"]))}

        def loss(net, b, norms, stats):
            return sft_batch_loss(net, b, norms, device)

        fit("sft", policy, full_masks(policy), batch_at, loss, so.work, steps=config.steps, lr=config.lr,
            cfg=cfg)
        val_acc = None
        if inputs["eval_questions"] and parallel.is_main():  # rank 0 only; the others wait in finish()
            questions = read_jsonl(inputs["eval_questions"], "questions", held=so.held)[:config.eval_n]
            val_acc = accuracy(policy, tok, questions, prompt, label="sft: validation")
            print(f"sft: validation greedy accuracy {100 * val_acc:.1f}% on {len(questions)} questions")
        return so.finish(policy, tok, trained_fraction=1.0, val_accuracy=val_acc)


# ----------------------------------------------------------------------------- sample: the data

@dataclass(frozen=True)
class SampleConfig:
    """sample: the model's own answers"""
    k: int = setting(8, "samples per question", type=count(1))
    held_out_k: int = setting(None, "samples per question of the --eval-questions files, whose pairs only "
                              "score the models (default: --k)", type=count(1), default_from="k")
    temperature: float = setting(1.0, "sampling temperature", type=real(0))
    top_p: float = setting(1.0, "nucleus sampling p", type=real(0, 1, open_low=True))
    max_pairs: int = setting(5, "pairs kept per question", type=count(0))
    n_sample: int = setting(1000, "training questions to sample, 0 = all", type=count(0))
    correct: str = setting(None, "a sample is correct when its final answer is right (answer, the paper's "
                           "rule; the default on your data) and, with steps, every number and sign of the "
                           "reference's steps too (the embedded task's step checker, and its default)",
                           choices=["steps", "answer"])
    gold_chosen: bool = setting(False, "questions with no correct sample pair the reference solution with "
                                "the wrong ones", variant=True)
    seed: int = seed_setting()
    prompt: PromptConfig = PromptConfig()


def stage_sample(config, inputs, out, device, force=False):
    """K responses per question of inputs["questions"] (the first n_sample, 0 = all), held_out_k per
    question of each file of inputs["eval_questions"], at the temperature, cut at the first stop
    string; correct = the reference's final answer (the paper) and, with correct="steps", every step
    of the reference solution too (the embedded task's step checker). Duplicates dropped. Writes
    out/pairs.jsonl: every (correct, wrong) of a question, at most max_pairs drawn with the seed;
    out/forget.jsonl: every wrong response, with its question and reference solution;
    out/<name>_pairs.jsonl: held-out pairs of each file <name>.jsonl of inputs["eval_questions"].
    Each process samples its contiguous share of the questions with seed + rank; the token ids are
    gathered in question order."""
    c, prompt = config, config.prompt
    files = [("train", inputs["questions"], "pairs.jsonl")]
    files += [(name, path, HELD_OUT.format(name)) for path in inputs["eval_questions"]
              for name in [os.path.splitext(os.path.basename(path))[0]]]
    if len({f[2] for f in files}) < len(files):
        raise UsageError(f"--eval-questions {' '.join(inputs['eval_questions'])}: two files of one name")
    # each process samples with seed + rank: the number of processes changes the samples
    with StageOutput("sample", out, config, inputs, device, force, world=parallel.world()) as so:
        if so.finished:
            return so.info
        tok = load_tokenizer(inputs["tokenizer"])
        rows_of = {path: read_jsonl(path, "questions", held=so.held) for _, path, _ in files}
        empty = next((path for path, rows in rows_of.items() if not rows), None)
        if empty:
            raise UsageError(f"{empty}: no questions to sample")
        answers = {path: reference_answers(rows) for path, rows in rows_of.items()}
        policy = load_model(inputs["model"], device, tok)
        rng, stats = random.Random(c.seed), {}
        for split, path, pairs_file in files:
            n = c.n_sample if split == "train" and c.n_sample else len(rows_of[path])
            k = c.k if split == "train" else c.held_out_k
            rows, final = rows_of[path][:n], answers[path][:n]
            prompts = [prompt_text(r["question"], prompt.template, tok, prompt.system) for r in rows]
            mine = [q for q in prompts[parallel.shard(len(prompts))] for _ in range(k)]  # K per question
            ids = generate_ids(policy, tok, mine, prompt.max_new_tokens, c.temperature, c.top_p,
                               c.seed + parallel.rank(), prompt.gen_batch_size, f"sample {split}",
                               prompt.stop, prompt.decode)
            ids = parallel.gather_rows([torch.tensor(t, dtype=torch.long) for t in ids], torch.long, device)
            texts = [cut_at_stop(tok.decode(t), prompt.stop) for t in ids]  # K per question, in order
            pairs, forget, stats[split] = sample_rows(rows, final, prompts, texts, k, c, rng)
            if parallel.is_main():
                write_jsonl(os.path.join(so.work, pairs_file), pairs)
                if split == "train":
                    write_jsonl(os.path.join(so.work, "forget.jsonl"), forget)
            s = stats[split]
            print(f"sample {split}: {len(rows)} questions x {k}: final answer right in "
                  f"{100 * s['sample_accuracy']:.1f}%, counted correct (--correct {c.correct}) "
                  f"{100 * s['steps_correct']:.1f}%; {len(pairs)} pairs, {len(forget)} wrong responses")
        return so.finish(**stats)


def sample_rows(rows, answers, prompts, texts, k, config, rng):
    """(pairs, forgetting rows, stats) from k sampled texts per question."""
    lead = response_lead(config.prompt.template)
    pairs, forget, n_correct, n_right = [], [], 0, 0
    for qi, (row, answer, prompt) in enumerate(zip(rows, answers, prompts)):
        drawn = [lead + t.strip() for t in texts[qi * k:(qi + 1) * k]]
        final = [is_correct(s, answer, config.prompt.answer_format) for s in drawn]
        problem = task.Problem(row["question"], row["answer"], answer)
        right = [ok and (config.correct == "answer" or task.steps_correct(problem, s))
                 for s, ok in zip(drawn, final)]
        n_correct += sum(final)
        n_right += sum(right)
        good = list(dict.fromkeys(s for s, ok in zip(drawn, right) if ok))
        bad = list(dict.fromkeys(s for s, ok in zip(drawn, right) if not ok))
        if not good and config.gold_chosen:  # not in the paper: the reference stands in as chosen
            good = [lead + row["answer"]]
        combos = [(c, w) for c in good for w in bad]
        for c, w in rng.sample(combos, min(config.max_pairs, len(combos))):
            pairs.append({"prompt": prompt, "chosen": c, "rejected": w})
        forget += [{"prompt": prompt, "response": w, "question": row["question"], "reference": row["answer"],
                    "answer": answer} for w in bad]
    stats = {"questions": len(rows), "sample_accuracy": n_correct / max(1, len(texts)),
             "steps_correct": n_right / max(1, len(texts)), "pairs": len(pairs),
             "wrong_responses": len(forget)}
    return pairs, forget, stats


# ----------------------------------------------------------------------------- dpo and learn: DPO

@dataclass(frozen=True)
class DPOConfig:
    """dpo: vanilla DPO, every parameter (key neurons locating; the full-parameter DPO baseline)"""
    lr: float = setting(1e-5, "dpo stage (vanilla DPO, every parameter) learning rate", flag="--dpo-lr",
                        type=rate)
    steps: int = setting(100, "dpo stage steps (and the learn stage's, unless --learn-steps)",
                         flag="--dpo-steps", type=count(1))
    pref: PreferenceConfig = PreferenceConfig()
    train: TrainConfig = TrainConfig()


@dataclass(frozen=True)
class LearnConfig:
    """learn: DPO with key tokens under the learning mask (alignment improving)"""
    lr: float = setting(3e-5, "learning-stage learning rate, under the mask", flag="--learn-lr", type=rate)
    steps: int = setting(None, "learning-stage steps (default: --dpo-steps, so that budgets are equal)",
                         flag="--learn-steps", type=count(1), default_from="dpo_steps")
    eps: float = setting(0.5, "key tokens: the share of the rejected response kept",
                         type=real(0, 1, open_low=True))
    lora_rank: int = setting(0, "a baseline, not ALLO: train low-rank adapters of this rank on every "
                             "linear layer instead of a mask (LoRA; lora.py), merged into the weights at "
                             "the end; 0: none", type=count(0), variant=True)
    pref: PreferenceConfig = PreferenceConfig()
    train: TrainConfig = TrainConfig()


def stage_dpo(config, inputs, out, device, force=False):
    """Key neurons locating, 1/2: vanilla DPO on every parameter (the full-parameter DPO baseline);
    its weight change ranks the neurons in the mask stage."""
    return train_dpo("dpo", config, 1.0, inputs, out, device, force)


def stage_learn(config, inputs, out, device, force=False):
    """Alignment improving: DPO whose rejected side counts through its key tokens (eps < 1), updating only the
    learning mask's entries (inputs["mask"] None: every parameter). Its output is the ALLO model."""
    return train_dpo("learn", config, config.eps, inputs, out, device, force, config.lora_rank)


def train_dpo(stage, config, eps, inputs, out, device, force, lora_rank=0):
    """DPO on the pairs of inputs["data"] from inputs["model"]; the reference is inputs["ref"]
    (default: the same starting weights), its log-probs cached once. lora_rank > 0: through low-rank
    adapters (lora.py) instead of a mask, merged into the output's weights."""
    cfg = config.train
    with StageOutput(stage, out, config, inputs, device, force) as so:
        if so.finished:
            return so.info
        tok = load_tokenizer(inputs["tokenizer"])
        data, model, ref = inputs["data"], inputs["model"], inputs.get("ref")
        pairs = read_jsonl(data, "pairs", held=so.held)
        if not pairs:
            raise UsageError(f"{data}: no preference pairs to train on")
        rows = encode_rows(tok, *pair_rows(pairs))  # chosen rows 0..n-1, rejected rows n..2n-1
        check_lengths(stage, tok, *rows, cfg.max_len, lambda i: pairs.where(i % len(pairs)))
        if lora_rank and inputs.get("mask"):
            raise UsageError(f"--lora-rank {lora_rank}: the adapters are what trains; give no --mask (or "
                             "--learn-ratio 1)")
        policy = load_model(model, device, tok)
        masks = load_masks(inputs.get("mask"), policy)
        cached = reference_pass(stage, so, policy, ref, model, tok, rows, cfg, device)
        fraction = allo.trained_fraction(masks, policy)
        if lora_rank:
            n_params = policy.num_params()
            torch.manual_seed(cfg.seed)  # the adapters' draw
            masks = lora.add_adapters(policy, lora_rank)
            fraction = sum(int(m.sum()) for m in masks.values()) / n_params
        steps = stage_steps(config.steps, config.pref.epochs, len(pairs), cfg)
        print(f"{stage}: {len(pairs)} pairs, trained fraction {fraction:.3f}, eps {eps}, lr {config.lr:g}, "
              f"{steps} steps" + (f", through LoRA adapters of rank {lora_rank}" if lora_rank else ""))

        def batch_at(i):
            return pair_batch(tok, rows, rank_batch(len(pairs), i, cfg), cached, cfg.max_len)

        def loss(net, b, norms, stats):
            return dpo_batch_loss(net, b, norms, device, config.pref.beta, eps, config.pref.nll, stats)

        fit(stage, policy, masks, batch_at, loss, so.work, steps=steps, lr=config.lr, cfg=cfg)
        if lora_rank:
            lora.merge(policy)  # each weight W + (alpha / r) B A, as the forward used it
        return so.finish(policy, tok, trained_fraction=fraction, steps=steps, lr=config.lr, eps=eps)


def reference_pass(stage, so, policy, ref, model, tok, rows, cfg, device):
    """The reference's per-token log-probs of rows (prompt and response ids), computed once for the
    stage. The reference is the model at `ref`, or the policy as loaded from `model` where ref is None
    or that same path. They come from the cache folder cfg.ref_cache where an earlier pass of the same
    model, rows and settings left them (bookkeeping/refcache.py); else they are computed and kept there."""
    own = ref in (None, model)
    cache = RefCache(cfg.ref_cache, so.fingerprint["inputs"]["model" if own else "ref"], *rows, cfg.max_len,
                     cfg.ref_batch_size, device, cfg.pack)
    cached = cache.load()
    if cached is not None:
        print(f"{stage}: reference log-probs read from the cache, {cache.path}")
        return cached
    reference = policy if own else load_model(ref, device, tok)
    cached = reference_logps(reference, tok, *rows, cfg.max_len, device, cfg.ref_batch_size,
                             label=f"{stage}: reference log-probs", pack=cfg.pack)
    cache.save(cached)
    return cached


# ----------------------------------------------------------------------------- mask: the key neurons

@dataclass(frozen=True)
class MaskConfig:
    """mask: the key neurons (key neurons locating)"""
    scorer: str = setting("delta", "key neurons from |theta_dpo - theta_sft| or accumulated DPO "
                          "gradients", choices=["delta", "grad"])
    forget_ratio: float = setting(0.1, "forgetting mask: top fraction; 1 = no mask", type=real(0, 1))
    learn_ratio: float = setting(0.1, "learning mask: top fraction; 1 = no mask", type=real(0, 1))
    grad_mode: str = setting("abs_sum", "--scorer grad: |sum g| (= SGD's weight change) or sum |g|",
                             choices=["abs_sum", "sum_abs"], variant=True)
    granularity: str = setting("entry", "mask unit: entries, or whole rows (neurons)",
                               choices=["entry", "neuron"], variant=True)
    exclude_top: float = setting(0.0, "skip the very top fraction (the release's l)", type=real(0, 1),
                                 variant=True)
    rank: str = setting("top", "which entries the masks keep: the top of the ranking (ALLO), its bottom, "
                        "or random ones (the study's controls)", flag="--mask-rank",
                        choices=["top", "bottom", "random"], variant=True)
    pref: PreferenceConfig = PreferenceConfig()
    train: TrainConfig = TrainConfig()


def stage_mask(config, inputs, out, device, force=False):
    """Importance of every entry: |theta_dpo - theta_model| (scorer "delta") or the DPO gradient
    accumulated over the pairs of inputs["data"] (scorer "grad", train.batch_size pairs at a time);
    then one global top-k% threshold for the forgetting mask and one for the learning mask (or the
    bottom-k%, or k% drawn at random with train.seed: the study's controls)."""
    cfg = config.train
    with StageOutput("mask", out, config, inputs, device, force) as so:
        if so.finished:
            return so.info
        tok = load_tokenizer(inputs["tokenizer"]) if config.scorer == "grad" else None
        model, dpo = inputs["model"], inputs.get("dpo_model")
        start = load_model(model, device, tok)
        if config.scorer == "delta":
            warm = load_model(dpo, device)
            if [p.shape for p in warm.parameters()] != [p.shape for p in start.parameters()]:
                raise UsageError(f"{dpo}: the DPO model's parameters are not those of {model}")
            scores = allo.importance_from_delta(dict(start.named_parameters()), dict(warm.named_parameters()))
        else:
            pairs = read_jsonl(inputs["data"], "pairs", held=so.held)
            n = len(pairs)
            if not n:
                raise UsageError(f"{inputs['data']}: no preference pairs to score with")
            rows = encode_rows(tok, *pair_rows(pairs))
            check_lengths("mask", tok, *rows, cfg.max_len, lambda i: pairs.where(i % n))
            cached = reference_pass("mask", so, start, None, model, tok, rows, cfg, device)
            batches = (pair_batch(tok, rows, list(range(i, min(n, i + cfg.batch_size))), cached, cfg.max_len)
                       for i in range(0, n, cfg.batch_size))

            def loss(m, b):  # the vanilla-DPO loss, each batch's share of the mean over all n pairs
                return dpo_batch_loss(m, b, Norms(pairs=n), device, config.pref.beta, 1.0)

            scores = allo.grad_importance(start, loss, batches, mode=config.grad_mode)
        if config.rank == "bottom":
            scores = {name: -s for name, s in scores.items()}
        elif config.rank == "random":
            g = torch.Generator(device).manual_seed(cfg.seed)  # drawn on the device, beside the other scores
            scores = {name: torch.rand(s.shape, generator=g, device=device) for name, s in scores.items()}
        info, made = {}, {}
        for name, ratio in (("forget", config.forget_ratio), ("learn", config.learn_ratio)):
            made[name] = allo.select_masks(scores, ratio, granularity=config.granularity,
                                           exclude_top=config.exclude_top)
            if parallel.is_main():
                with writing(os.path.join(so.work, f"{name}.safetensors")):
                    allo.save_masks(os.path.join(so.work, f"{name}.safetensors"), made[name])
            info[f"{name}_fraction"] = allo.trained_fraction(made[name])
            print(f"mask {name}: {100 * info[f'{name}_fraction']:.2f}% of entries; by module type:")
            print(allo.format_table([r for r in allo.mask_summary(made[name]) if r["by"] == "type"]))
        print("mask by layer (learning mask):")
        print(allo.format_table([r for r in allo.mask_summary(made["learn"]) if r["by"] == "layer"]))
        return so.finish(scorer=config.scorer, granularity=config.granularity, **info)


# --------------------------------------------------------------------- rewriter: the token-level reward model

def rewriter_prompt(row):
    """What the rewriter sees: the question, the response to fix and a correct reference solution.
    The reference comes last, right before the rewrite, with a response's leading space, so that
    its tokens are those the rewrite copies (docs/stages.md tells why this order)."""
    return f"Question: {row['question']}\nDraft:{row['response']}\nReference: {row['reference']}\nRewrite:"


@dataclass(frozen=True)
class RewriterConfig:
    """rewriter: the token-level reward model (unaligned knowledge forgetting)"""
    steps: int = setting(300, "rewriter training steps", flag="--rewriter-steps", type=count(1))
    lr: float = setting(1e-3, "rewriter learning rate", flag="--rewriter-lr", type=rate)
    tau: float = setting(0.5, "unaligned token: rewriter p_t < tau", type=real(0, 1, open_low=True))
    weights_mode: str = setting("hard", "forgetting weights: 1[p_t < tau] or 1 - p_t",
                                choices=["hard", "soft"], variant=True)
    train: TrainConfig = TrainConfig()


def stage_rewriter(config, inputs, out, device, force=False):
    """Unaligned knowledge forgetting, 1/2: train the rewriter, a copy of inputs["model"], to turn
    (question, wrong response, reference solution) into the response minimally corrected, then score
    every wrong response of inputs["data"] (forgetting rows with their "question" and "reference"):
    p_t of each of its tokens, unaligned = p_t < tau. The target of a wrong response is its rewrite
    in inputs["rewrites"] ({"prompt", "response", "rewrite"}, e.g. written by a stronger model) or
    else, a weaker proxy, the reference solution; the correct responses (the chosen side of
    inputs["pairs"]) are rewrites of themselves, as in RLMEC. Writes out/forget_weighted.jsonl."""
    cfg, tau = config.train, config.tau
    with StageOutput("rewriter", out, config, inputs, device, force) as so:
        if so.finished:
            return so.info
        tok = load_tokenizer(inputs["tokenizer"])
        data = inputs["data"]
        forget = read_jsonl(data, "forget", held=so.held)
        examples, errors_at, n_given = rewrite_examples(forget, inputs.get("rewrites"), inputs.get("pairs"),
                                                        so.held)
        max_len = 3 * cfg.max_len
        prompts, targets = encode_rows(tok, [e[0] for e in examples], [e[1] for e in examples])
        check_lengths("rewriter", tok, prompts, targets, max_len,
                      lambda i: f"{data} (rewrite example {i + 1})")
        rewriter = load_model(inputs["model"], device, tok)
        print(f"rewriter: {len(examples)} rewrite examples; of {len(forget)} wrong responses {n_given} with "
              f"a given rewrite, {len(forget) - n_given} with the reference solution as target")

        def batch_at(i):
            idx = rank_batch(len(examples), i, cfg)
            b = collate(tok, [prompts[k] for k in idx], [targets[k] for k in idx], max_len)
            return {**b, "norms": Norms(scored_tokens=n_scored(b["labels"]))}

        def loss(net, b, norms, stats):
            return sft_batch_loss(net, b, norms, device)

        fit("rewriter", rewriter, full_masks(rewriter), batch_at, loss, so.work, steps=config.steps,
            lr=config.lr, cfg=cfg)
        scored = score_tokens(rewriter, tok, forget, tau, config.weights_mode, cfg.batch_size, max_len,
                              device)
        if parallel.is_main():
            write_jsonl(os.path.join(so.work, "forget_weighted.jsonl"), scored)
        info = {"unaligned_tokens": sum(sum(w > 0 for w in s["weights"]) for s in scored),
                "tokens": sum(len(s["weights"]) for s in scored)}
        line = f"rewriter: {info['unaligned_tokens']}/{info['tokens']} response tokens unaligned " \
               f"(p_t < {tau})"
        if any(at >= 0 for at in errors_at):  # the first wrong step is known (the embedded task's rewrites)
            recall, precision, found = task.flag_quality(tok, scored, errors_at, tau)
            info.update(first_error_recall=recall, flag_precision=precision)
            line += (f"; first wrong step found in {100 * recall:.1f}% of {found} wrong responses; "
                     f"{100 * precision:.1f}% of flagged tokens lie at or after it")
        print(line)
        return so.finish(rewriter, tok, trained_fraction=1.0, **info)


def rewrite_examples(forget, rewrites, pairs, held=None):
    """The rewriter's (prompt, target) examples, deduplicated: each wrong response with its given
    rewrite or, without one, its reference solution; each correct response (pairs' chosen side) as
    itself. Also the char index of each wrong response's first error (-1: not known) and the number
    of given rewrites. held: the bytes of the files already read (read_jsonl)."""
    for i, r in enumerate(forget):
        if not all(isinstance(r.get(f), str) for f in ("question", "reference")):
            raise DataError(f"{forget.where(i)}: the rewriter needs the fields 'question' and 'reference' "
                            "(the sample stage writes them)")
    given = {(r["prompt"], r["response"]): r for r in (read_jsonl(rewrites, "rewrites", held=held) if rewrites
                                                       else [])}
    fixes = [given.get((r["prompt"], r["response"])) for r in forget]
    lead = [r["response"][:len(r["response"]) - len(r["response"].lstrip())] for r in forget]  # leading space
    examples = [(rewriter_prompt(r), fix["rewrite"] if fix else space + r["reference"])
                for r, fix, space in zip(forget, fixes, lead)]
    by_prompt = {r["prompt"]: r for r in forget}
    for p in read_jsonl(pairs, "pairs", held=held) if pairs else []:  # a correct response is its own rewrite
        if p["prompt"] in by_prompt:
            row = {**by_prompt[p["prompt"]], "response": p["chosen"]}
            examples.append((rewriter_prompt(row), p["chosen"]))
    if not examples:
        raise UsageError(f"{forget.path}: no wrong responses to rewrite")
    errors_at = [fix.get("first_error", -1) if fix else -1 for fix in fixes]
    return list(dict.fromkeys(examples)), errors_at, sum(f is not None for f in fixes)


def score_tokens(rewriter, tok, forget, tau, weights_mode, batch_size, max_len, device):
    """p_t and w_t of every token of every forgetting response, teacher-forced as the rewrite of
    itself; each process scores its contiguous share and every process gets them all, in order."""
    mine = forget[parallel.shard(len(forget))]
    prompts, responses = encode_rows(tok, [rewriter_prompt(r) for r in mine], [r["response"] for r in mine])
    p_rows, w_rows = [], []  # p_t, w_t [n_tok] of each response of this process
    for i in batches("rewriter: scoring", len(mine), batch_size, "responses"):
        b = collate(tok, prompts[i:i + batch_size], responses[i:i + batch_size], max_len)
        b = {k: b[k].to(device) for k in ("input_ids", "labels")}  # right-padded: no attention mask needed
        with autocast(device):
            probs = allo.rewriter_token_probs(rewriter, b)  # [B,T], 0 off-target
        weights = allo.unaligned_token_weights(probs, b["labels"], tau, weights_mode)
        for r, p_row, w_row, lab in zip(responses[i:i + batch_size], probs, weights, b["labels"]):
            n_tok = len(r)
            p_rows.append(p_row[lab != -100][:n_tok])  # drop the EOS target
            w_rows.append(w_row[lab != -100][:n_tok])
    p_rows = parallel.gather_rows(p_rows, torch.float32, device)  # every response, in order
    w_rows = parallel.gather_rows(w_rows, torch.float32, device)
    return [{"prompt": r["prompt"], "response": r["response"], "weights": w.tolist(), "probs": p.tolist()}
            for r, p, w in zip(forget, p_rows, w_rows, strict=True)]


# ----------------------------------------------------------------------------- forget: token-level NPO

@dataclass(frozen=True)
class ForgetConfig:
    """forget: token-level NPO under the forgetting mask (unaligned knowledge forgetting)"""
    lr: float = setting(3e-5, "forgetting learning rate", flag="--forget-lr", type=rate)
    steps: int = setting(50, "forgetting steps", flag="--forget-steps", type=count(1))
    pref: PreferenceConfig = PreferenceConfig()
    all_tokens: bool = setting(False, "forget every response token, not only the unaligned ones")
    train: TrainConfig = TrainConfig()


def stage_forget(config, inputs, out, device, force=False):
    """Unaligned knowledge forgetting, 2/2, token-level NPO: -w_t log sigmoid(-beta r_t) on the
    weighted (unaligned) tokens of the wrong responses of inputs["data"] (all_tokens: every token);
    reference = inputs["ref"] (default: the starting model); only the entries of inputs["mask"] move
    (None: every parameter)."""
    cfg = config.train
    with StageOutput("forget", out, config, inputs, device, force) as so:
        if so.finished:
            return so.info
        tok = load_tokenizer(inputs["tokenizer"])
        data, model, ref = inputs["data"], inputs["model"], inputs.get("ref")
        rows = read_jsonl(data, "forget", tok, held=so.held)
        if not rows:
            raise UsageError(f"{data}: no forgetting examples")
        prompts, responses = encode_rows(tok, [r["prompt"] for r in rows], [r["response"] for r in rows])
        check_lengths("forget", tok, prompts, responses, cfg.max_len, rows.where)
        policy = load_model(model, device, tok)
        masks = load_masks(inputs.get("mask"), policy)
        weights = None if config.all_tokens else [r.get("weights", [1.0] * len(ids))
                                                  for r, ids in zip(rows, responses)]
        cached = reference_pass("forget", so, policy, ref, model, tok, (prompts, responses), cfg, device)
        fraction = allo.trained_fraction(masks, policy)
        steps = stage_steps(config.steps, config.pref.epochs, len(rows), cfg)
        print(f"forget: {len(rows)} wrong responses, trained fraction {fraction:.3f}, "
              f"{'all tokens' if config.all_tokens else 'unaligned tokens'}, lr {config.lr:g}, {steps} steps")

        def batch_at(i):
            idx = rank_batch(len(rows), i, cfg)
            b = collate(tok, [prompts[k] for k in idx], [responses[k] for k in idx], cfg.max_len,
                        None if weights is None else [weights[k] for k in idx])
            if weights is None:  # NPO on every response token: the EOS target too
                b["weights"] = (b["labels"] != -100).float()
            b["norms"] = Norms(weighted_tokens=int((b["weights"] != 0).sum()),
                               scored_tokens=n_scored(b["labels"]))  # the weighted share's denominator
            return with_reference(b, cached, idx)

        def loss(net, b, norms, stats):
            return npo_batch_loss(net, b, norms, device, config.pref.beta, stats)

        fit("forget", policy, masks, batch_at, loss, so.work, steps=steps, lr=config.lr, cfg=cfg)
        return so.finish(policy, tok, trained_fraction=fraction, steps=steps)


# ----------------------------------------------------------------------------- the pipeline

STAGES = {"sft": (stage_sft, SFTConfig), "sample": (stage_sample, SampleConfig),
          "dpo": (stage_dpo, DPOConfig), "mask": (stage_mask, MaskConfig),
          "rewriter": (stage_rewriter, RewriterConfig), "forget": (stage_forget, ForgetConfig),
          "learn": (stage_learn, LearnConfig)}  # in the order they run

# Each stage's inputs, and where each comes from when its flag (--<input name>) does not name it:
#   "sample/pairs.jsonl"  a file an earlier stage wrote into the run directory
#   "sft/"                an earlier stage's model (with --skip-sft, "sft/" is the model as given)
#   "run:questions"       one of the run's own inputs, recorded in <run>/run.json: your files, or the
#                         embedded task's (written into <run>/task/); "?" marks one that may be absent
PIPELINE = {
    "sft": dict(model="run:model?", data="run:sft_data", eval_questions="run:validation?"),
    "sample": dict(model="sft/", questions="run:questions", eval_questions="run:eval_questions"),
    "dpo": dict(model="sft/", data="sample/pairs.jsonl", ref=None),
    "mask": dict(model="sft/", dpo_model="dpo/", data="sample/pairs.jsonl"),
    "rewriter": dict(model="sft/", data="sample/forget.jsonl", pairs="sample/pairs.jsonl",
                     rewrites="run:rewrites?"),
    "forget": dict(model="sft/", data="rewriter/forget_weighted.jsonl", mask="mask/forget.safetensors",
                   ref=None),
    "learn": dict(model="forget/", data="sample/pairs.jsonl", mask="mask/learn.safetensors", ref=None),
}
def stage_config(name, a, record):
    """The config of stage `name` from the flags `a` (by field name)."""
    if name == "sample":
        own = (record or {}).get("inputs", {}).get("correct", "answer")  # the embedded task checks steps
        return flags.config_from(SampleConfig, a, correct=a.correct or own)
    return flags.config_from(STAGES[name][1], a)


def run_stage(name, a, run, device):
    if device.type == "cuda":  # StageOutput.finish() records the stage's peak
        torch.cuda.reset_peak_memory_stats(device)
    record = None if a.force and name == "sft" else load_record(run)  # sft --force writes it anew
    if name == "sample" and record and record["inputs"]["pairs"]:
        raise UsageError(f"{run}: a run on preference pairs (--pairs) samples nothing: its pairs are in "
                         f"{os.path.join(run, 'pairs')}/")
    if name == "sft" and not (a.model or a.data) and (record is None or record["inputs"]["embedded"]):
        record = start_run(a, run, ROWS)  # the embedded task, stage by stage: its files written or checked
    config = stage_config(name, argparse.Namespace(**{**vars(a), "ref_cache": ref_cache(a, run)}), record)
    function = STAGES[name][0]
    inputs = stage_inputs(name, a, run, config, PIPELINE[name])
    return function(config, inputs, a.out or os.path.join(run, name), device, a.force)


def ref_cache(a, run):
    """--ref-cache: the folder named; 'off': None; by default <run>/cache/ for a stage of the run, none for
    a stage whose --out puts it outside."""
    if a.ref_cache is None:
        return None if a.out else os.path.join(run, "cache")
    return None if a.ref_cache == "off" else a.ref_cache


def run_stages(a, run, stages, device):
    """The named stages in order on the run directory (each skips itself when finished alike; SFT
    too where the run skips it); returns the run's record (run.json)."""
    fresh = not os.path.exists(os.path.join(run, "run.json"))
    record = start_run(a, run, ROWS)
    # --model is the run's starting model (run.json), not an override of every stage's own: each
    # stage starts from the one PIPELINE names (sample from sft/, learn from forget/, ...); --pairs are
    # the run's pairs, which the stages read as <run>/pairs/ holds them
    a = argparse.Namespace(**{**vars(a), "model": None, "pairs": None})
    skipped = {"sft": record["inputs"]["skip_sft"], "sample": bool(record["inputs"]["pairs"])}
    try:
        for stage in stages:
            if not skipped.get(stage):
                run_stage(stage, a, run, device)
    except BaseException:
        if fresh:  # nothing of the run stays: its record goes, so a corrected command is not refused
            drop_unused_record(run, STAGES)
        raise
    return record


def run_all(a, run, device):
    """Every stage in order (each skips itself when finished alike), then the table of the last
    evaluation file."""
    names = ("out", "data", "mask", "dpo_model", "rewriter_init", "ref")
    explicit = [f"--{k.replace('_', '-')}" for k in names if getattr(a, k)]
    if explicit:
        raise UsageError(f"{explicit[0]} names one stage's input: use it with --stage")
    t0 = time.time()
    record = run_stages(a, run, STAGES, device)
    if parallel.is_main():  # the table on rank 0 only
        rows, split = evaluate_run(run, None, a.device, a.beta)
        reference = "the starting model" if record["inputs"]["skip_sft"] else "the SFT model"
        print(markdown_table(rows, split, reference))
        write_json(os.path.join(run, f"eval_{split}.json"), {"split": split, "rows": rows})
    print(f"pipeline: {time.time() - t0:.0f}s")


def gguf_models(a):
    """--model, --ref and --rewriter-init given as llama.cpp GGUF files: each converted once into a
    model folder of the run (bookkeeping/gguf_io.py; rank 0 converts, the others wait), which every
    stage then reads."""
    for key in ("model", "ref", "rewriter_init"):
        path = getattr(a, key)
        if path and path.endswith(".gguf"):
            if parallel.is_main():
                gguf_io.model_folder(path, a.run)
            parallel.barrier()
            setattr(a, key, gguf_io.model_folder(path, a.run))


def parse_args(argv=None):
    return flags.parse_train_args(argv, list(STAGES), CONFIGS, description=__doc__)


CONFIGS = [task.TaskConfig, ArchConfig, TrainConfig, PreferenceConfig, PromptConfig, SFTConfig, SampleConfig,
           DPOConfig, MaskConfig, RewriterConfig, ForgetConfig, LearnConfig]
flags.check_settings(CONFIGS)  # a flag declared twice, differently, stops at import


def main(argv=None):
    a = parse_args(argv)
    flags.apply_machine_flags(a)
    device = parallel.init(pick_device(a.device))
    if not parallel.is_main():  # rank 0 prints the progress of all
        sys.stdout = open(os.devnull, "w")
    if parallel.world() > 1:
        print(f"torchrun: {parallel.world()} processes on {device.type}, {parallel.world()} x {a.batch_size} "
              f"examples per micro-batch, {a.grad_accum} micro-batches per step")
    status = 0
    try:
        gguf_models(a)
        if a.stage == "all":
            run_all(a, a.run, device)
        else:
            run_stage(a.stage, a, a.run, device)
    except (UsageError, DataError, OSError, SafetensorError) as e:  # OSError, SafetensorError: a full disk
        if parallel.is_main():  # every process raises the same error
            print(f"error: {one_line(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        status = 2
    except (Interrupted, KeyboardInterrupt) as e:
        if parallel.is_main():
            print(e if isinstance(e, Interrupted) else "interrupted; rerun the same command to go on "
                  "(finished stages are skipped)", file=sys.stderr)
        status = 130
    finally:  # after the except block, which frees the error's traceback and the DDP wrapper in it,
        parallel.shutdown()  # so that no process exits with the process group still referenced
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
