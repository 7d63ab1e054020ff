import math

import pytest
import torch

from model import ModelConfig, Transformer, apply_rope, rope_cos_sin, rope_inv_freq, sample_next

CFG = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**CFG.__dict__, **kw})).eval()


def test_logits_shape_and_causality():
    m = tiny()
    x = torch.randint(0, 61, (3, 9))
    logits = m(x)
    assert logits.shape == (3, 9, 61)
    y = x.clone()
    y[:, 5:] = (y[:, 5:] + 1) % 61  # changing the future must not change the past
    torch.testing.assert_close(m(y)[:, :5], logits[:, :5], rtol=0, atol=0)


def test_keep_gives_the_full_logits_at_the_kept_positions():
    """forward(keep=mask) -> the rows of the full [B,T,V] logits at the True positions, in row-major
    order (float64: the head runs on fewer rows, nothing else changes); with a padded batch too."""
    m = tiny().double()
    x = torch.randint(0, 61, (3, 9))
    attn = torch.ones(3, 9, dtype=torch.long)
    attn[2, :4] = 0  # left padding
    keep = torch.rand(3, 9, generator=torch.Generator().manual_seed(1)) < 0.4
    for mask in (None, attn):
        full = m(x, mask)
        got = m(x, mask, keep=keep)
        assert got.shape == (int(keep.sum()), 61)
        torch.testing.assert_close(got, full[keep], rtol=0, atol=1e-12)
    last = torch.zeros(3, 9, dtype=torch.bool)
    last[:, -1] = True  # what generate's prefill keeps
    torch.testing.assert_close(m(x, attn, keep=last), m(x, attn)[:, -1], rtol=0, atol=1e-12)


def test_generation_computes_only_the_last_positions_logits():
    """The prefill and every step hand the head one position per row ([B,V]), and the tokens are
    those of the argmax of the full forward."""
    m = tiny()
    shapes = []
    m.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    new = m.generate(prompts, 4, eos_id=-1, pad_id=0)
    assert shapes == [(2, 61)] * 4
    ids = [p + n for p, n in zip(prompts, new)]
    for row, prompt in zip(ids, prompts):
        full = m(torch.tensor([row[:-1]]))[0]
        assert full[len(prompt) - 1:].argmax(-1).tolist() == row[len(prompt):]


def test_rope_matches_complex_rotation_float64():
    """Rotate-half RoPE = multiplying (x_i, x_{i+hd/2}) by exp(i * pos * theta^(-2i/hd))."""
    hd, T = 8, 5
    x = torch.randn(1, 1, T, hd, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(T)[None], hd, 10000.0)
    got = apply_rope(x, cos.double(), sin.double())
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2:])
    inv_freq = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq
    z = z * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], -1), rtol=1e-6, atol=1e-6)


LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)


def test_llama3_rope_scaling_by_hand_float64():
    """Llama 3 RoPE scaling, written out per frequency as Meta's apply_scaling states it. head_dim 16,
    theta 100: wavelengths 2*pi*100^(i/8) = 6.3 | 11.2, 19.9 | 35.3 .. 353 against L/4 = 8 and L/1 = 32."""
    hd, theta, L = 16, 100.0, LLAMA3["original_max_position_embeddings"]
    low, high, factor = LLAMA3["low_freq_factor"], LLAMA3["high_freq_factor"], LLAMA3["factor"]
    want, bands = [], []
    for i in range(0, hd, 2):
        f = theta ** (-i / hd)
        wavelen = 2 * math.pi / f
        if wavelen < L / high:
            bands.append("kept")
            want.append(f)
        elif wavelen > L / low:
            bands.append("divided")
            want.append(f / factor)
        else:
            s = (L / wavelen - low) / (high - low)
            assert 0.05 < s < 0.95  # well inside the band, not a boundary case
            bands.append("interpolated")
            want.append((1 - s) * f / factor + s * f)
    assert bands == ["kept"] + ["interpolated"] * 2 + ["divided"] * 5
    got = rope_inv_freq(hd, theta, LLAMA3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    plain = rope_inv_freq(hd, theta)
    assert torch.equal(got[0], plain[0]) and torch.equal(got[3:], plain[3:] / factor)
    # the angles rope_cos_sin uses are positions times the scaled frequencies
    pos = torch.arange(50)[None]
    cos, sin = rope_cos_sin(pos, hd, theta, LLAMA3)
    angle = pos[0, :, None].double() * torch.tensor(want, dtype=torch.float64)
    torch.testing.assert_close(cos[0, 0].double(), torch.cat([angle, angle], -1).cos(), rtol=0, atol=1e-5)
    torch.testing.assert_close(sin[0, 0].double(), torch.cat([angle, angle], -1).sin(), rtol=0, atol=1e-5)


def test_llama3_rope_scaling_that_changes_nothing_is_plain_rope():
    pos = torch.arange(200)[None]
    plain = rope_cos_sin(pos, 16, 10000.0)
    # factor 1: every band keeps its frequency (up to rounding of s*f + (1-s)*f)
    cos, sin = rope_cos_sin(pos, 16, 10000.0, {**LLAMA3, "factor": 1.0})
    torch.testing.assert_close(cos, plain[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(sin, plain[1], rtol=0, atol=1e-5)
    # a pretraining context so long that every wavelength is in the kept band: exactly plain RoPE
    longest = 2 * math.pi * 10000.0 ** (14 / 16)
    kept_all = {**LLAMA3, "original_max_position_embeddings": int(LLAMA3["high_freq_factor"] * longest) + 1}
    assert torch.equal(rope_inv_freq(16, 10000.0, kept_all), rope_inv_freq(16, 10000.0))
    m, m_scaled = tiny(), tiny(rope_scaling=kept_all)
    x = torch.randint(0, 61, (2, 40))
    assert torch.equal(m(x), m_scaled(x))
    # ... while a scaling that moves some bands changes the angles, and so the logits
    assert (rope_cos_sin(pos, 16, 10000.0, LLAMA3)[0] - plain[0]).abs().max() > 0.5
    assert not torch.equal(tiny(rope_scaling=LLAMA3)(x), m(x))


def test_llama3_cached_generation_equals_uncached():
    m = tiny(rope_scaling={**LLAMA3, "original_max_position_embeddings": 8})
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12]]
    cached = m.generate(prompts, 20, eos_id=60, pad_id=0)
    assert cached == m.generate(prompts, 20, eos_id=60, pad_id=0, use_cache=False)


@pytest.mark.parametrize("scaling", [
    {**LLAMA3, "rope_type": "llama3"},  # only the four numbers
    {k: v for k, v in LLAMA3.items() if k != "factor"},
    {**LLAMA3, "low_freq_factor": 4.0},  # empty middle band
    {**LLAMA3, "factor": 0.0},
])
def test_malformed_rope_scaling_is_refused(scaling):
    with pytest.raises(ValueError, match="rope_scaling"):
        ModelConfig(rope_scaling=scaling)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = tiny(n_kv_heads=2)
    mha = tiny(n_kv_heads=4)
    sd = gqa.state_dict()
    hd, rep = CFG.head_dim, CFG.n_heads // 2
    for k, v in list(sd.items()):
        if k.endswith(("k_proj.weight", "v_proj.weight")):  # [Hkv*hd, D] -> [H*hd, D], each kv head repeated
            sd[k] = v.view(2, hd, -1).repeat_interleave(rep, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(sd)
    x = torch.randint(0, 61, (2, 11))
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def test_left_and_right_padding_match_unpadded():
    m = tiny()
    seqs = [torch.randint(0, 61, (n,)) for n in (7, 3, 10)]
    T = 10
    for side in ("left", "right"):
        ids = torch.zeros(3, T, dtype=torch.long)
        mask = torch.zeros(3, T, dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            ids[i, sl], mask[i, sl] = s, 1
        out = m(ids, mask)
        assert torch.isfinite(out).all()
        for i, s in enumerate(seqs):
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            torch.testing.assert_close(out[i, sl], m(s[None])[0], rtol=1e-5, atol=1e-5)


def test_cached_equals_uncached_generation_greedy_and_sampled():
    m = tiny()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    cached = m.generate(prompts, 16, eos_id=60, pad_id=0)
    assert cached == m.generate(prompts, 16, eos_id=60, pad_id=0, use_cache=False)
    runs = []
    for use_cache in (True, False, True):
        g = torch.Generator().manual_seed(7)
        runs.append(m.generate(prompts, 16, eos_id=60, pad_id=0, temperature=1.0, top_p=0.9, generator=g,
                               use_cache=use_cache))
    assert runs[0] == runs[1] == runs[2]
    g = torch.Generator().manual_seed(8)
    assert m.generate(prompts, 16, eos_id=60, pad_id=0, temperature=1.0, generator=g) != runs[0]


def test_distinct_gives_first_occurrences_and_each_prompts_own():
    from model import distinct
    first, copy = distinct([[1, 2], [3], [1, 2], [1], [3], [1, 2]], torch.device("cpu"))
    assert first.tolist() == [0, 1, 3] and copy.tolist() == [0, 1, 0, 2, 1, 0]
    assert distinct([[1, 2], [2, 1], [1]], torch.device("cpu")) == (slice(None), slice(None))


def test_repeated_prompts_are_computed_once_and_sampled_as_their_own_rows():
    """K samples of a prompt: the prompts' pass runs on the distinct prompts only (the head sees 3
    rows, then 6 at every step), and the samples equal the uncached loop's, which computes every
    row of every step from its tokens (the same draws from the same generator)."""
    m = tiny()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [1, 2, 3], [4, 5, 6, 7, 8], [1, 2, 3], [9]]
    shapes = []
    hook = m.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    cached = m.generate(prompts, 12, eos_id=-1, pad_id=0, temperature=1.0,
                        generator=torch.Generator().manual_seed(3))
    hook.remove()
    assert shapes == [(3, 61)] + [(6, 61)] * 11
    assert cached == m.generate(prompts, 12, eos_id=-1, pad_id=0, temperature=1.0, use_cache=False,
                                generator=torch.Generator().manual_seed(3))
    assert cached[0] != cached[2] != cached[4]  # one prompt, each row its own draws


def test_greedy_generation_matches_argmax_of_forward():
    m = tiny()
    prompt = [5, 9, 2]
    out = m.generate([prompt], 6, eos_id=60, pad_id=0)[0]
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[3:]


def test_each_row_stops_at_its_own_eos():
    m = tiny()
    prompts = [[1, 2, 3], [7, 7]]
    free = m.generate(prompts, 12, eos_id=-1, pad_id=0)
    eos = free[0][4]  # the token row 0 emits at step 5 becomes EOS
    out = m.generate(prompts, 12, eos_id=eos, pad_id=0)
    assert out[0] == free[0][: free[0].index(eos)]
    expected1 = free[1][: free[1].index(eos)] if eos in free[1] else free[1]
    assert out[1] == expected1


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.7, g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 covers p=0.7; tokens 2 and 3 are outside
    assert {int(sample_next(logits, 1.0, 0.01, g)) for _ in range(50)} == {0}


def sorted_nucleus(probs, top_p):
    """The nucleus by sorting every token (the reference for model.nucleus)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p
    return torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))


def test_nucleus_equals_sorting_every_token():
    """Bit for bit the full sort's kept set and values (so the same draws), for nuclei from 1 token
    (peaked rows) to most of a 1,000-token vocabulary (flat rows: k grows from 8 past 512, to the
    whole row)."""
    from model import nucleus
    sizes = []
    for scale in (0.1, 1.0, 4.0, 12.0):
        probs = torch.softmax(scale * torch.randn(32, 1000, generator=torch.Generator().manual_seed(5)), -1)
        for top_p in (0.01, 0.5, 0.9, 0.95, 0.999):
            got = nucleus(probs, top_p, k=8)
            assert torch.equal(got, sorted_nucleus(probs, top_p)), (scale, top_p)
            sizes += (got > 0).sum(-1).tolist()
    assert min(sizes) == 1 and max(sizes) > 512


def test_draw_equals_torch_multinomial_token_for_token():
    """model.draw against torch.multinomial(probs, 1) under the same seed: the same token in every
    row, and the generator left where multinomial leaves it (the next draws equal), for whole rows
    (top-p 1) and nuclei of 1 to hundreds of tokens, over a small and a SmolLM2-sized vocabulary
    (the CPU's exponential_ serial loop the draw reproduces is the same at any size), in float32
    and float64."""
    from model import draw, nucleus
    n_draws = 0
    for V, rows, dtype in ((320, 64, torch.float32), (49152, 8, torch.float32), (320, 16, torch.float64)):
        for scale in (0.5, 4.0, 16.0):
            logits = scale * torch.randn(rows, V, generator=torch.Generator().manual_seed(V), dtype=dtype)
            for top_p in (1.0, 0.95, 0.5):
                probs = torch.softmax(logits, -1)
                probs = nucleus(probs, top_p) if top_p < 1 else probs
                for seed in range(4 if V > 1000 else 40):
                    ours, theirs = (torch.Generator().manual_seed(seed) for _ in range(2))
                    got = draw(probs, ours)
                    want = torch.multinomial(probs, 1, generator=theirs)[:, 0]
                    assert torch.equal(got, want), (V, scale, top_p, seed)
                    assert torch.equal(torch.rand(3, generator=ours), torch.rand(3, generator=theirs))
                    n_draws += rows
    assert n_draws > 20000


def test_save_then_load_gives_identical_logits(tmp_path):
    for tie, scaling in ((True, None), (False, None), (True, LLAMA3)):
        m = tiny(tie_embeddings=tie, rope_scaling=scaling)
        d = tmp_path / f"tie{tie}-scaled{scaling is not None}"
        m.save_pretrained(d)
        back = Transformer.from_pretrained(d).eval()
        assert back.cfg == m.cfg
        x = torch.randint(0, 61, (2, 8))
        torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)
        assert not list(d.glob("*.tmp"))


def test_gradient_checkpointing_gives_the_same_gradients():
    m = tiny().train()
    x = torch.randint(0, 61, (2, 9))
    attn = torch.ones(2, 9, dtype=torch.long)
    attn[1, 6:] = 0  # a padded row: the mask goes through the checkpointed blocks too
    grads = []
    for on in (False, True):
        m.grad_checkpointing = on
        m.zero_grad()
        m(x, attn).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0)


def test_right_padded_rows_need_no_attention_mask():
    """train.py runs its right-padded batches without a mask: the real positions must not change."""
    m = tiny()
    seqs = [torch.randint(0, 61, (n,)) for n in (7, 3, 10)]
    batch = torch.zeros(3, 10, dtype=torch.long)  # right-padded with token 0
    for i, s in enumerate(seqs):
        batch[i, :len(s)] = s
    out = m(batch)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(out[i, :len(s)], m(s[None])[0], rtol=1e-5, atol=1e-5)


def test_a_row_stops_at_its_stop_mid_batch_and_the_batch_ends_when_every_row_has():
    """`finished` (a stop string in a row's decoded tail, as eval.generate_ids passes it) ends that row
    at the token that completes it; the other rows and the tokens before the stop are what an
    unstopped run gives, greedy and sampled; once every row has finished, no more forward passes."""
    m = tiny()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    for temperature in (0.0, 1.0):
        def run(finished=None):
            g = torch.Generator().manual_seed(3)
            return m.generate(prompts, 20, eos_id=60, pad_id=0, temperature=temperature, generator=g,
                              finished=finished)

        free = run()
        stop = free[0][4]  # a token row 0 emits mid-way
        stopped = run(lambda new: new[-1] == stop)
        for row, full in zip(stopped, free):
            end = full.index(stop) + 1 if stop in full else len(full)
            assert row == full[:end]
        assert len(stopped[0]) <= 5 < len(free[0])
    calls = []
    m.register_forward_hook(lambda *args: calls.append(1))
    assert m.generate(prompts, 20, eos_id=60, pad_id=0, finished=lambda new: len(new) == 3) == [
        row[:3] for row in m.generate(prompts, 3, eos_id=60, pad_id=0)]
    assert len(calls) == 3 + 3  # 3 steps each run: the first ended when every row had 3 tokens


# ------------------------------------------------------------------------ the slots loop (generate_refill)

def lively(scale=20.0):
    """tiny() with its weights (not the norms' gains) scaled up: its greedy rows vary instead of
    repeating one token, so rows end at EOS at many different steps."""
    m = tiny()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.mul_(scale)
    return m


def ragged_prompts(n=17, seed=3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (n,), generator=g).tolist()
    return [torch.randint(1, 61, (k,), generator=g).tolist() for k in lengths]


def test_decode_at_fixed_shapes_gives_the_forward_logits():
    """prefill + decode (per-slot lengths, one fixed-shape step) against the full forward of each
    sequence: the same logits up to float32 rounding (another summation order over the masked keys)."""
    from model import SlotCache
    m = tiny(rope_scaling=LLAMA3)
    prompts = ragged_prompts(4)
    cache = SlotCache(m.cfg, 4, 20, torch.device("cpu"), torch.float32)
    first = m.prefill(prompts, [0, 1, 2, 3], cache)
    for p, row in zip(prompts, first):
        torch.testing.assert_close(row, m(torch.tensor([p]))[0, -1], rtol=1e-5, atol=1e-5)
    tokens = torch.tensor([7, 8, 9, 10])
    logits = m.decode(tokens, cache)
    for p, t, row in zip(prompts, tokens.tolist(), logits):
        torch.testing.assert_close(row, m(torch.tensor([p + [t]]))[0, -1], rtol=1e-5, atol=1e-5)


def test_prefill_of_a_repeated_prompt_fills_its_slots_from_one_row():
    """prefill runs the forward on the distinct prompts only; each slot of a prompt gets that row's
    keys, values and logits, which are the prompt's own forward's (up to float32 rounding)."""
    from model import SlotCache
    m = tiny()
    prompts, slots = [[5, 6, 7], [8, 9], [5, 6, 7], [5, 6, 7]], [3, 0, 1, 2]
    cache = SlotCache(m.cfg, 4, 12, torch.device("cpu"), torch.float32)
    shapes = []
    hook = m.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    logits = m.prefill(prompts, slots, cache)
    hook.remove()
    assert shapes == [(2, 61)] and cache.lens.tolist() == [2, 3, 3, 3]
    assert torch.equal(cache.k[:, 1], cache.k[:, 3]) and torch.equal(cache.v[:, 2], cache.v[:, 3])
    assert torch.equal(logits[0], logits[2]) and torch.equal(logits[0], logits[3])
    for p, row in zip(prompts, logits):
        torch.testing.assert_close(row, m(torch.tensor([p]))[0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slots, check_every", [(1, 1), (3, 1), (5, 4), (64, 1)])
def test_refilled_slots_give_greedy_rows_as_today_and_as_a_batch_of_one(slots, check_every):
    """Prompts of different lengths, EOS mid-batch and a stop condition: generate_refill's greedy
    rows equal generate()'s (the batches loop) token for token, whatever the slot count and however
    late the host checks."""
    m = lively()
    prompts = ragged_prompts()
    free = m.generate(prompts, 14, eos_id=-1, pad_id=0)
    ends = {t: {r.index(t) if t in r else 14 for r in free} for t in range(61)}
    eos = max(ends, key=lambda t: len(ends[t]))  # the token that, as EOS, ends rows at the most steps
    ref = m.generate(prompts, 14, eos_id=eos, pad_id=0)
    assert len({len(r) for r in ref}) > 3 and {0, 14} & {len(r) for r in ref} != {len(r) for r in ref}
    got = m.generate_refill(prompts, 14, eos, slots=slots, check_every=check_every)
    assert got == ref == [m.generate([p], 14, eos_id=eos, pad_id=0)[0] for p in prompts]

    def stop(new):  # a stop string's stand-in: the row ends at the token that makes it true
        return new[-1] == free[1][3]

    ref = m.generate(prompts, 14, eos_id=eos, pad_id=0, finished=stop)
    assert ref != m.generate(prompts, 14, eos_id=eos, pad_id=0)
    assert m.generate_refill(prompts, 14, eos, finished=stop, slots=slots, check_every=check_every) == ref


def test_refill_of_no_prompts_is_no_rows():
    assert tiny().generate_refill([], 4, eos_id=60) == []


def test_refilled_sampling_reproduces_itself_and_the_seed_matters():
    m = tiny()
    prompts = ragged_prompts()

    def sample(seed, slots=4):
        g = torch.Generator().manual_seed(seed)
        return m.generate_refill(prompts, 10, eos_id=60, temperature=1.0, top_p=0.9, generator=g,
                                 slots=slots)

    assert sample(1) == sample(1) != sample(2)
    assert all(0 <= t < 61 for row in sample(1) for t in row)


def test_cuda_graphs_only_on_cuda_and_the_cpu_step_is_eager():
    from model import cuda_graphs
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert cuda_graphs(cuda, None) and cuda_graphs(cuda, True) and not cuda_graphs(cuda, False)
    assert not cuda_graphs(cpu, None) and not cuda_graphs(cpu, True)
    m = tiny()
    out = m.generate_refill(ragged_prompts(5), 6, eos_id=60, slots=2, graphs=True)  # no CUDA call on a CPU
    assert out == m.generate(ragged_prompts(5), 6, eos_id=60, pad_id=0)


def test_decode_loop_auto_is_slots_on_cuda_batches_elsewhere():
    from data import decode_loop
    assert decode_loop("auto", torch.device("cuda")) == "slots"
    assert decode_loop("auto", torch.device("cpu")) == "batches"
    assert decode_loop("slots", torch.device("cpu")) == "slots"
    with pytest.raises(ValueError, match="decode must be one of"):
        decode_loop("fast", torch.device("cpu"))
