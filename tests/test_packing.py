"""Packed rows (data.pack, Transformer(..., doc_ids=, branch_ids=, positions=), trainer.scored_logps):
several sequences a row, each attending only to itself, rows with the same prompt holding it once,
give the losses and gradients of the padded batch.

The model is float64, so "equal" means equal up to float64 rounding: the packed batch sums the
same terms in another order (bound 1e-12, a million times float64's epsilon and far below any real
difference: a sequence attending to its neighbour moves its logits by ~1e-2)."""

import pytest
import torch

import trainer
from data import pack
from model import ModelConfig, Transformer
from trainer import Norms

CPU = torch.device("cpu")
LENGTHS = [2, 61, 7, 33, 3, 40, 12, 5]  # very different lengths; the pair rows are [0..3] and [4..7]
TOL = 1e-12  # float64 rounding, see the module docstring


def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                      max_seq_len=128)
    return Transformer(cfg).double()


def padded_batch(lengths, prompt=1, same_prompt=(), common=0):
    """Right-padded rows as data.collate makes them: the first `prompt` tokens unscored.
    same_prompt: pairs (a, b), row b's prompt made row a's; common: every row's first `common`
    tokens made row 0's (a system prompt)."""
    g = torch.Generator().manual_seed(1)
    B, T = len(lengths), max(lengths)
    ids, am = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(4, 50, (n,), generator=g)
    for a, b in same_prompt:
        ids[b, :prompt] = ids[a, :prompt]
    ids[:, :common] = ids[0, :common]
    for b, n in enumerate(lengths):
        am[b, :n] = 1
        labels[b, prompt - 1:n - 1] = ids[b, prompt:n]
    weights = torch.rand(B, T, generator=g, dtype=torch.float64).round() * (labels != -100)
    ref = torch.randn(B, T, generator=g, dtype=torch.float64) * (labels != -100)
    return {"input_ids": ids, "attention_mask": am, "labels": labels, "weights": weights, "ref": ref}


def test_pack_places_every_real_token_once_within_capacity():
    b = padded_batch(LENGTHS)
    p = pack(b, 64)
    B, T = b["input_ids"].shape
    real = p["source"][p["source"] >= 0]
    assert sorted(real.tolist()) == sorted(i * T + t for i, n in enumerate(LENGTHS) for t in range(n))
    assert p["input_ids"].shape[1] <= 64 and p["input_ids"].shape[0] < len(LENGTHS)
    assert torch.equal(p["input_ids"][p["source"] >= 0], b["input_ids"].flatten()[real])
    assert torch.equal(p["labels"][p["source"] >= 0], b["labels"].flatten()[real])
    assert (p["labels"][p["source"] < 0] == -100).all() and (p["doc_ids"][p["source"] < 0] == -1).all()
    assert torch.equal(p["positions"][p["source"] >= 0], real % T)
    # a capacity below the longest row packs into rows of that row's length, first-fit decreasing:
    # [61], [40, 12, 7, 2], [33, 5, 3] (groups numbered from 1; these rows share no prefix)
    assert pack(b, 8)["doc_ids"].max(1).values.tolist() == [1, 4, 3]


# pairs as a preference batch lays them out (rows i and i + 4 share a prompt) and a prompt shared by
# three rows (4, 5, 6 after row 4's pair is made 0's); prompts of 5 tokens, lengths 6 to 61
SHARED_LENGTHS = [6, 61, 7, 33, 9, 40, 12, 8]
PAIRS = ((0, 4), (1, 5), (2, 6), (3, 7))
TRIPLE = ((0, 4), (0, 5), (0, 6))


def test_pack_holds_a_shared_prompt_once():
    """Rows with the same prompt: its tokens but the last once, then each row's last prompt token and
    response; every scored target exactly once, with its own row's label and position."""
    b = padded_batch(SHARED_LENGTHS, prompt=5, same_prompt=PAIRS)
    B, T = b["input_ids"].shape
    p = pack(b, 128)
    real = p["source"][p["source"] >= 0]
    assert len(real) == sum(SHARED_LENGTHS) - 4 * 4  # 4 of the 5 prompt tokens held once per pair
    assert len(set(real.tolist())) == len(real)
    scored = (b["labels"].flatten() != -100).nonzero().squeeze(1)
    assert sorted(real[p["labels"][p["source"] >= 0] != -100].tolist()) == scored.tolist()
    assert torch.equal(p["input_ids"][p["source"] >= 0], b["input_ids"].flatten()[real])
    assert torch.equal(p["positions"][p["source"] >= 0], real % T)
    assert p["branch_ids"].max() == 2 and p["doc_ids"].max() <= 4  # each pair a group of two branches
    # a group too long for a packed row is split: rows 1 and 5 (61 + 40 - 4 tokens) into two of 61
    split = pack(b, 64)
    assert len(split["source"][split["source"] >= 0]) == sum(SHARED_LENGTHS) - 3 * 4
    assert split["input_ids"].shape[1] <= 64


def test_pack_holds_a_prefix_every_row_shares_once_per_packed_row():
    """Tokens every row begins with before its first target (a system prompt) start each packed row
    once, as group 0, and no group holds them again; they stop at the first scored target."""
    b = padded_batch(SHARED_LENGTHS, prompt=5, same_prompt=PAIRS, common=3)
    B, T = b["input_ids"].shape
    p = pack(b, 128)
    groups = p["doc_ids"].max(1).values  # a packed row's groups are 1 .. its largest id
    real = p["source"][p["source"] >= 0]
    assert (groups > 1).any()  # a packed row where groups share the prefix
    assert len(real) == sum(SHARED_LENGTHS) - 4 * 4 - 3 * int((groups - 1).sum())
    assert (p["doc_ids"][:, :3] == 0).all() and (p["doc_ids"][:, 3:] != 0).all()
    assert torch.equal(p["positions"][:, :3], torch.arange(3).expand(len(groups), 3))
    scored = (b["labels"].flatten() != -100).nonzero().squeeze(1)
    assert sorted(real[p["labels"][p["source"] >= 0] != -100].tolist()) == scored.tolist()
    assert torch.equal(p["input_ids"][p["source"] >= 0], b["input_ids"].flatten()[real])
    assert not (pack(padded_batch(SHARED_LENGTHS, 5, PAIRS), 128)["doc_ids"] == 0).any()  # none shared
    # every row with the same 7 first tokens: one prompt (5 tokens), so the prefix is its first 4
    one = pack(padded_batch(SHARED_LENGTHS, 5, common=7), 128)
    assert ((one["doc_ids"] == 0).sum(1) == 4).all()
    assert sorted(one["source"][one["labels"] != -100].tolist()) == scored.tolist()


@pytest.mark.parametrize("lengths, prompt, same, capacity, common", [
    (LENGTHS, 1, (), 64, 0), (SHARED_LENGTHS, 5, PAIRS, 128, 0), (SHARED_LENGTHS, 5, TRIPLE, 128, 0),
    (SHARED_LENGTHS, 5, PAIRS, 64, 0), (SHARED_LENGTHS, 5, PAIRS, 128, 3), (SHARED_LENGTHS, 5, (), 64, 7)],
    ids=["alone", "pairs", "three-rows", "split", "common-prefix", "one-prompt"])
def test_packed_logits_equal_each_sequence_alone(lengths, prompt, same, capacity, common):
    """Each row's packed logits are its logits alone: a branch that saw a sibling, or a token at
    another position, would move them by ~1e-2."""
    m = model()
    b = padded_batch(lengths, prompt, same, common)
    p = pack(b, capacity)
    packed = m(p["input_ids"], doc_ids=p["doc_ids"], branch_ids=p["branch_ids"],
               positions=p["positions"])  # [R,C,V]
    B, T = b["input_ids"].shape
    for i, n in enumerate(lengths):
        alone = m(b["input_ids"][i:i + 1, :n])[0]  # [n,V]
        mine = (p["source"] >= i * T) & (p["source"] < i * T + n)
        assert (packed[mine] - alone[p["source"][mine] - i * T]).abs().max() < TOL
        assert mine.sum() >= n - prompt + 1  # its last prompt token and response are its own


def losses(m, b):
    n = len(b["input_ids"]) // 2
    chosen_tokens = int((b["labels"][:n] != -100).sum())
    return {
        "sft": trainer.sft_batch_loss(m, b, Norms(scored_tokens=int((b["labels"] != -100).sum())), CPU),
        "npo": trainer.npo_batch_loss(m, b, Norms(weighted_tokens=int((b["weights"] != 0).sum())), CPU, 0.1),
        "dpo": trainer.dpo_batch_loss(m, b, Norms(pairs=n, chosen_tokens=chosen_tokens), CPU, 0.1, 0.5,
                                      nll=0.3),
    }


@pytest.mark.parametrize("shared", ["own-prompts", "shared-prompts", "common-prefix"])
@pytest.mark.parametrize("loss", ["sft", "npo", "dpo"])
def test_packed_losses_and_gradients_equal_the_padded_batch(loss, shared):
    """SFT, NPO with token weights, DPO with key tokens (eps 0.5) and its NLL term: the pair's rows
    land in different packed rows, or share their prompt (the gradient of its tokens then comes
    from both rows), or every row shares a prefix too (from all the rows of its packed row), and
    the loss is that of the padded batch."""
    m = model()
    b = {"own-prompts": lambda: padded_batch(LENGTHS, prompt=2),
         "shared-prompts": lambda: padded_batch(SHARED_LENGTHS, 5, PAIRS),
         "common-prefix": lambda: padded_batch(SHARED_LENGTHS, 5, PAIRS, common=3)}[shared]()
    capacity = 128 if shared == "common-prefix" else 64  # 128: two groups after one prefix
    results = []
    for batch in (b, {**b, "packed": pack(b, capacity)}):
        m.zero_grad()
        value = losses(m, batch)[loss]
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in m.parameters()]))
    (a, ga), (c, gc) = results
    assert abs(a - c) < TOL and a != 0
    assert max((x - y).abs().max() for x, y in zip(ga, gc)) < TOL
    assert max(x.abs().max() for x in ga) > 1e-3  # gradients that are there to compare


def test_a_packed_reference_pass_equals_the_padded_one_row_for_row(monkeypatch):
    """trainer.reference_logps(pack=True) runs the rows sorted by prompt, so a pair shares a batch and
    its prompt, packed; each row's log-probs come back in the rows' own order, equal to the padded
    pass's to float64 rounding."""
    shared = []  # per batch of the packed pass: the prompts held once for two rows
    forward_logps = trainer.forward_logps

    def counted(m, b, device):
        p = b.get("packed")
        groups = p and p["doc_ids"] + 1000 * torch.arange(len(p["doc_ids"]))[:, None]  # unique per row
        shared.append(0 if p is None else len(groups[p["branch_ids"] == 2].unique()))
        return forward_logps(m, b, device)

    monkeypatch.setattr(trainer, "forward_logps", counted)
    m = model()
    b = padded_batch(SHARED_LENGTHS, 5, PAIRS)
    rows = [b["input_ids"][i, :n].tolist() for i, n in enumerate(SHARED_LENGTHS)]
    prompts, responses = [r[:5] for r in rows], [r[5:] for r in rows]
    tok = StubTokenizer()
    padded = trainer.reference_logps(m, tok, prompts, responses, 64, CPU, batch_size=4)
    shared.clear()
    packed = trainer.reference_logps(m, tok, prompts, responses, 64, CPU, batch_size=4, pack=True)
    # batches of pairs 0, 1 (pair 1's 61 + 40 tokens split: over 64) and 2, 3, each packed
    assert sorted(shared) == [1, 2]
    assert [len(r) for r in padded] == [n - 5 + 1 for n in SHARED_LENGTHS]  # each response and EOS
    assert all((x - y).abs().max() < TOL for x, y in zip(padded, packed))
    # batches of 4 in prompt order hold two whole pairs; in row order none
    order = sorted(range(8), key=prompts.__getitem__)
    assert all(order.index(a) // 4 == order.index(c) // 4 for a, c in PAIRS)


def test_a_packed_reference_pass_in_two_processes_returns_every_row_in_its_place(monkeypatch):
    """Each of two processes takes its contiguous share of the rows in prompt order; gathered, every row
    is back in its own place, as one process computes it (float32, as the pass returns them: the same
    batches, so the same bits)."""
    from bookkeeping import parallel
    m = model()
    b = padded_batch(SHARED_LENGTHS, 5, PAIRS)
    rows = [b["input_ids"][i, :n].tolist() for i, n in enumerate(SHARED_LENGTHS)]
    prompts, responses = [r[:5] for r in rows], [r[5:] for r in rows]
    one = trainer.reference_logps(m, StubTokenizer(), prompts, responses, 64, CPU, batch_size=2, pack=True)
    shares = {}

    def gather_rows(out, dtype, device):  # what torch.distributed's gather gives every rank
        shares[parallel.rank()] = [r.to(dtype) for r in out]
        return shares[0] + shares[1]

    monkeypatch.setattr(parallel, "world", lambda: 2)
    monkeypatch.setattr(parallel, "gather_rows", gather_rows)
    monkeypatch.setattr(parallel, "rank", lambda: 1)
    with pytest.raises(KeyError):  # rank 1 computes its share; rank 0's is not there yet
        trainer.reference_logps(m, StubTokenizer(), prompts, responses, 64, CPU, batch_size=2, pack=True)
    monkeypatch.setattr(parallel, "rank", lambda: 0)
    two = trainer.reference_logps(m, StubTokenizer(), prompts, responses, 64, CPU, batch_size=2, pack=True)
    assert len(shares[0]) == len(shares[1]) == 4
    assert [len(r) for r in two] == [len(r) for r in one]
    assert all(torch.equal(x, y) for x, y in zip(one, two))


def test_eval_pair_sums_equal_each_row_scored_alone():
    """eval.pair_logps (a pair's rows in one batch, their prompt held once): each response's summed
    log-probs, its EOS included, as the model gives them on the row alone. The pass keeps each token's
    log-prob in float32, as the reference pass does, so a sum of up to 57 of them (each about -4)
    agrees to 1e-4, far below the ~1e-2 per token that seeing a sibling would add."""
    import eval as evaluation
    m = model()
    b = padded_batch(SHARED_LENGTHS, 5, PAIRS)
    rows = [b["input_ids"][i, :n].tolist() for i, n in enumerate(SHARED_LENGTHS)]
    pairs = [{"prompt": rows[a][:5], "chosen": rows[a][5:], "rejected": rows[c][5:]} for a, c in PAIRS]
    chosen, rejected, n_chosen = evaluation.pair_logps(m, StubTokenizer(), pairs, 64, batch_size=4)

    def alone(prompt, response):
        ids = torch.tensor(prompt + response + [StubTokenizer.eos_id])
        logps = m(ids[None])[0].log_softmax(-1)[:-1].gather(-1, ids[1:, None])[:, 0]
        return logps[len(prompt) - 1:].sum().item()

    for p, c, r, n in zip(pairs, chosen, rejected, n_chosen):
        assert abs(c - alone(p["prompt"], p["chosen"])) < 1e-4 and n == len(p["chosen"]) + 1
        assert abs(r - alone(p["prompt"], p["rejected"])) < 1e-4


class StubTokenizer:
    """What collate asks of a tokenizer, for rows given as ids: no BOS added, EOS 3, PAD 0."""
    prefix, eos_id, pad_id = [], 3, 0

    def prompt_ids(self, ids):
        return list(ids)


def test_a_stage_trains_packed(smoke_run, tmp_path):
    """--pack reaches the training loop and enters the stage's fingerprint."""
    import json

    import train
    out = tmp_path / "sft"
    train.main(["--preset", "smoke", "--run", smoke_run, "--stage", "sft", "--pack", "--out", str(out)])
    assert json.load(open(out / "stage.json"))["fingerprint"]["train"]["pack"] is True


def test_packed_rows_are_used_only_where_they_save_a_tenth_of_the_positions():
    assert "packed" in trainer.packed(padded_batch(LENGTHS), 64)  # 8 x 61 -> 3 x 64 positions
    same = padded_batch([20] * 8)
    assert "packed" not in trainer.packed(same, 40)  # 8 x 20 -> 4 x 40: nothing saved
    assert "packed" not in trainer.packed(padded_batch([30, 28, 28, 10]), 40)  # 4 x 30 -> 3 x 40: 100%
    # the row length is chosen for the fewest positions: [30], [25, 10], [25] in rows of 35, not 40
    assert trainer.packed(padded_batch([30, 25, 25, 10]), 40)["packed"]["input_ids"].shape == (3, 35)
    # on a grid fine enough to find [17, 8], [12, 11] in rows of 25 below a capacity of 39 (a grid
    # of five lengths, 17, 22, 28, 33, 39, finds [17, 11], [12, 8] in rows of 28 at best)
    assert trainer.packed(padded_batch([17, 12, 11, 8]), 39)["packed"]["input_ids"].shape == (2, 25)
    assert "packed" in trainer.packed(padded_batch([30, 20, 20, 10]), 40)  # 4 x 30 -> 2 x 40: 67%
