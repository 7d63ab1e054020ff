import io
import os
import re

import pytest
import sentencepiece as spm
import torch

import data
import task
from bookkeeping import fileio
from data import DataError
from task import Problem


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return task.train_task_tokenizer(str(tmp_path_factory.mktemp("tok") / "tok.model"))


# ----------------------------------------------------------------------------- tokenizer

def test_trained_tokenizer_ids_and_round_trip(tok):
    assert (tok.pad_id, tok.sp.unk_id(), tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    for p in task.make_splits(1, 50, 0, 0)["train"]:
        ex = task.sft_example(p)
        text, answer = data.prompt_text(ex["question"]), " " + ex["answer"]
        prompt, response = tok.encode(text), tok.encode(answer)
        assert tok.decode(prompt + response) == text + answer
        specials = [tok.bos_id] + prompt + response + [tok.eos_id, tok.pad_id]
        assert tok.decode(specials) == text + answer
        assert tok.sp.unk_id() not in prompt + response
        assert tok.decode(response) == answer
        assert tok.prompt_ids(text) == [tok.bos_id] + prompt  # Llama 2's rule: BOS before every prompt


def test_numbers_are_single_pieces(tok):
    for n in range(task.MAX_VALUE + 1):
        assert len(tok.encode(f" {n}")) == 1
    assert tok.decode(tok.encode(" 12 + 3 = 15.")) == " 12 + 3 = 15."


def test_tokenizer_training_is_deterministic_and_loads_from_file(tmp_path):
    a = task.train_task_tokenizer(str(tmp_path / "a.model"))
    b = task.train_task_tokenizer(str(tmp_path / "b.model"))
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))
    c = data.Tokenizer(str(tmp_path / "a.model"))
    text = data.prompt_text("Mia has 14 apples.") + " 14 + 7 = 21. The answer is 21."
    assert c.encode(text) == a.encode(text) == b.encode(text) and c.decode(c.encode(text)) == text


def test_tokenizer_without_pad_uses_eos(tmp_path):
    # a Llama-style model: pad_id -1, bos 1, eos 2, dummy prefix
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world, this is a test."] * 20),
                                   model_writer=model, vocab_size=30, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=2, hard_vocab_limit=False)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    t = data.Tokenizer(str(tmp_path / "tokenizer.model"))
    assert (t.bos_id, t.eos_id, t.pad_id) == (1, 2, 2)
    ids = t.encode("hello world")
    assert t.bos_id not in ids and t.decode([t.bos_id] + ids + [t.eos_id]) == "hello world"


# ----------------------------------------------------------------------------- the task

def check_problem(p, max_value, max_operand):
    steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", p.solution)
    assert steps and p.solution.endswith(f"The answer is {p.answer}.")
    start = int(re.search(r"has (\d+) ", p.question).group(1))
    assert int(steps[0][0]) == start
    for i, (a, op, b, c) in enumerate(steps):
        a, b, c = int(a), int(b), int(c)
        assert task.apply_op(a, op, b) == c and 0 <= c <= max_value and 1 <= b <= max_operand
        assert i == 0 or a == int(steps[i - 1][3])
        assert f" {b}" in p.question
    assert int(steps[-1][3]) == int(p.answer)


def test_splits_deterministic_disjoint_and_valid():
    a = task.make_splits(7, 300, 50, 50)
    assert a == task.make_splits(7, 300, 50, 50)
    assert a != task.make_splits(8, 300, 50, 50)
    assert [len(a[k]) for k in ("train", "val", "test")] == [300, 50, 50]
    questions = [p.question for split in a.values() for p in split]
    assert len(set(questions)) == len(questions)
    for p in [p for split in a.values() for p in split]:
        check_problem(p, task.MAX_VALUE, task.MAX_OPERAND)
    # test and val do not move when train grows
    b = task.make_splits(7, 600, 50, 50)
    assert b["test"] == a["test"] and b["val"] == a["val"]


def test_difficulty_knobs():
    s = task.make_splits(0, 200, 0, 0, min_steps=4, max_steps=4, max_operand=5, max_value=20, ops=("+", "*"))
    for p in s["train"]:
        check_problem(p, 20, 5)
        assert p.solution.count("=") == 4 and " - " not in p.solution
    with pytest.raises(ValueError, match="distinct"):
        task.make_splits(0, 10000, 0, 0, min_steps=1, max_steps=1, max_operand=2, max_value=5)
    with pytest.raises(ValueError, match="ops"):
        task.make_splits(0, 10, 0, 0, ops=("/",))


# ----------------------------------------------------------------------------- answers

@pytest.mark.parametrize("text, expected", [
    ("14 + 7 = 21. The answer is 21.", "21"),
    ("The answer is 3. Wait. The answer is 5.", "5"),
    ("the ANSWER is  42  ", "42"),
    ("The answer is 42 .  ", "42"),
    ("The answer is abc.", "abc"),
    ("The answer is", ""),
    ("no marker here 42.", None),
    ("", None),
])
def test_extract_answer_the_answer_is(text, expected):
    assert data.extract_answer(text, "the-answer-is") == expected


@pytest.mark.parametrize("text, fmt, expected", [
    # GSM8K: the text after the last "####", its first line
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "gsm8k", "72"),
    ("#### 1,200\nQuestion: next one", "gsm8k", "1,200"),
    ("a #### 3 then #### 4.", "gsm8k", "4"),
    ("The answer is 5.", "gsm8k", None),
    # the last number: signs, commas, decimals, dollars
    ("I had 3 and got -12.5 in the end.", "last-number", "-12.5"),
    ("It costs $1,234 in all.", "last-number", "$1,234"),
    ("no digits", "last-number", None),
    # auto: "####" first, then "The answer is", then the last number
    ("The answer is 7. #### 8", "auto", "8"),
    ("2 + 3 = 5. The answer is 5. Then 9.", "auto", "5. Then 9"),
    ("2 + 3 = 5, so 5", "auto", "5"),
    ("nothing", "auto", None),
])
def test_extract_answer_formats(text, fmt, expected):
    assert data.extract_answer(text, fmt) == expected


@pytest.mark.parametrize("a, b, same", [
    ("1,200", "1200", True), ("$1,200.0", "1200", True), ("72.", "72", True), ("72.0", "72", True),
    ("-3.0", "-3", True), ("7.5", "7.50", False), ("72.05", "72", False), ("Two", " two ", True),
    ("0.0", "0", True), ("12", "2", False),
])
def test_answers_compare_after_normalizing(a, b, same):
    assert (data.normalize_answer(a) == data.normalize_answer(b)) == same


def test_is_correct():
    assert data.is_correct(" 1 + 1 = 2. The answer is 2.", "2")
    assert data.is_correct("THE ANSWER IS Two.", " two ")
    assert not data.is_correct("The answer is 2. The answer is 3.", "2")
    assert not data.is_correct("The answer is 12.", "2")
    assert not data.is_correct("", "2")
    assert data.is_correct("2", "2")  # auto: the last number
    assert not data.is_correct("2", "2", "the-answer-is")
    assert data.is_correct("so she has $1,200.\n#### 1,200", "1200.0", "gsm8k")
    with pytest.raises(ValueError):
        data.extract_answer("x", "json")


def test_prompt_templates(tmp_path):
    assert data.prompt_text("Q?") == "Question: Q?\nAnswer:"
    chat = '<|user|>{question} {"json": 1}<|assistant|>'
    assert data.prompt_text("Q?", chat) == '<|user|>Q? {"json": 1}<|assistant|>'
    (tmp_path / "t.txt").write_text("Q: 1+1?\nA: 2\n\nQ: {question}\nA:")
    assert data.read_template(f"@{tmp_path / 't.txt'}").endswith("Q: {question}\nA:")
    with pytest.raises(DataError, match="no {question}"):
        data.read_template("Question:")
    with pytest.raises(DataError, match="cannot read"):
        data.read_template(f"@{tmp_path / 'missing.txt'}")


REF = Problem("Mia has 14 apples. She buys 7 more. Then she gives away 5. How many apples does Mia have now?",
              "14 + 7 = 21. 21 - 5 = 16. The answer is 16.", "16")


@pytest.mark.parametrize("response, corrected, at", [
    (" 14 + 7 = 21. 21 - 5 = 16. The answer is 16.", " 14 + 7 = 21. 21 - 5 = 16. The answer is 16.", -1),
    (" 14 + 7 = 22. 22 - 5 = 17. The answer is 17.", " 14 + 7 = 21. 21 - 5 = 16. The answer is 16.", 10),
    (" 14 + 7 = 21. 21 - 5 = 15. The answer is 15.", " 14 + 7 = 21. 21 - 5 = 16. The answer is 16.", 23),
    (" 14 + 8 = 22. 22 - 5 = 17. The answer is 17.", " 14 + 7 = 21. 21 - 5 = 16. The answer is 16.", 6),
    (" 14 - 7 = 7. 7 - 5 = 2. The answer is 2.", " 14 + 7 = 21. 21 - 5 = 16. The answer is 16.", 4),
    (" 14 + 7 = 21. 21 - 5 = 16. The answer is 61.", " 14 + 7 = 21. 21 - 5 = 16. The answer is 16.", 41),
    # the wording between the steps is kept
    ("14 + 7 = 22, so 22 - 5 = 17. the answer is 17", "14 + 7 = 21, so 21 - 5 = 16. the answer is 16", 9),
])
def test_correct_response(response, corrected, at):
    assert task.correct_response(REF, response) == (corrected, at)


def test_steps_correct_is_stricter_than_the_final_answer():
    right = " 14 + 7 = 21. 21 - 5 = 16. The answer is 16."
    lucky = " 14 + 7 = 22. 22 - 5 = 15. The answer is 16."  # a wrong chain, the right last number
    assert task.steps_correct(REF, right) and data.is_correct(right, "16")
    assert data.is_correct(lucky, "16") and not task.steps_correct(REF, lucky)
    assert not task.steps_correct(REF, " 14 + 7 = 21. The answer is 16.")  # a step missing: unparseable


@pytest.mark.parametrize("response, at", [
    (" 14 + 7 = 21. The answer is 21.", 14),  # a step skipped: the error is where it stops early
    (" 14 + 7 = 21. 21 - 5 = 16. 16 + 1 = 17. The answer is 17.", 27),  # a step too many
    (" 14 + 7 = 21. 21 - 5 = 16. So 16.", 27),  # no answer marker
    (" 14 + 7 = 21. 21 = 5 - 16. The answer is 16.", 17),  # slots out of place
    ("I do not know.", 0),
    ("", 0),
])
def test_correct_response_falls_back_to_the_reference(response, at):
    lead = " " if response.startswith(" ") else ""
    assert task.correct_response(REF, response) == (lead + REF.solution, at)


def test_correct_response_on_generated_problems():
    for p in task.make_splits(3, 100, 0, 0)["train"]:
        nums = list(re.finditer(r"\d+", p.solution))
        m = nums[2]  # the result of the first step
        wrong = p.solution[:m.start()] + str(int(m.group()) + 1) + p.solution[m.end():]
        assert task.correct_response(p, wrong) == (p.solution, m.start())
        assert task.correct_response(p, p.solution) == (p.solution, -1)


# ----------------------------------------------------------------------------- JSONL

def write(tmp_path, text):
    path = tmp_path / "x.jsonl"
    path.write_text(text)
    return str(path)


def read_error(path, kind, tok=None):
    with pytest.raises(DataError) as e:
        data.read_jsonl(path, kind, tok)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_jsonl_round_trip(tmp_path, tok):
    rows = [{"prompt": "Q é", "response": " 1 + 2 = 3.", "weights": [0, 1.0, 0.5, 1, 0.0, 2]},
            {"prompt": "Q", "response": " x", "extra": 1}]
    path = str(tmp_path / "f.jsonl")
    fileio.write_jsonl(path, rows)
    assert not list(tmp_path.glob("*.tmp"))
    assert data.read_jsonl(path, "forget", tok) == rows
    with open(path, "a") as f:
        f.write("\n   \n")  # blank lines are skipped
    assert data.read_jsonl(path, "forget") == rows


def test_two_writers_of_one_file_each_leave_a_whole_file(tmp_path):
    """Two writes of one path that overlap (as study seeds run side by side do): each renames its
    own temporary file, the one that finishes last wins, nothing is left beside it."""
    path = str(tmp_path / "results.json")
    with fileio.atomic_path(path) as outer, open(outer, "w") as f:
        f.write("outer, ")
        fileio.write_json(path, {"writer": "inner"})
        f.write("whole")
    assert open(path).read() == "outer, whole"
    assert not list(tmp_path.glob("*.tmp"))


def test_jsonl_errors(tmp_path, tok):
    ok = '{"input": "a", "output": "b"}\n'
    p = write(tmp_path, ok + '{"input": "a", "output": \n')
    assert read_error(p, "sft").startswith(f"{p}:2: malformed JSON")
    p = write(tmp_path, ok + "\n\n" + '{"input": "a"}\n')
    msg = read_error(p, "sft")
    assert msg.startswith(f"{p}:4:") and "missing field 'output'" in msg
    p = write(tmp_path, '{"input": "a", "output": 3}\n')
    msg = read_error(p, "sft")
    assert msg.startswith(f"{p}:1:") and "'output'" in msg and "string" in msg
    p = write(tmp_path, '{"prompt": "a", "chosen": "b"}\n')
    assert "missing field 'rejected'" in read_error(p, "pairs")
    p = write(tmp_path, "[1, 2]\n")
    assert read_error(p, "pairs").startswith(f"{p}:1: expected a JSON object")
    p = write(tmp_path, '{"prompt": "a", "response": " 1 + 2", "weights": [1, 1]}\n')
    msg = read_error(p, "forget", tok)
    assert msg.startswith(f"{p}:1:") and "'weights'" in msg and "2 entries" in msg and "3 tokens" in msg
    assert data.read_jsonl(p, "forget")[0]["weights"] == [1, 1]  # no tokenizer, no length check
    for bad in ['"1 1"', "[1, -1]", "[1, true]", '[1, "x"]', "[1, NaN]"]:
        p = write(tmp_path, '{"prompt": "a", "response": "b", "weights": %s}\n' % bad)
        msg = read_error(p, "forget")
        assert msg.startswith(f"{p}:1:") and "'weights'" in msg
    (tmp_path / "bin.jsonl").write_bytes(b'{"input": "\xff"}\n')
    binary = str(tmp_path / "bin.jsonl")
    assert read_error(binary, "sft").startswith(f"{binary}:1: not valid UTF-8")
    missing = str(tmp_path / "nope.jsonl")
    assert read_error(missing, "sft").startswith(f"{missing}: cannot read")
    with pytest.raises(ValueError):
        data.read_jsonl(missing, "dpo")


# ----------------------------------------------------------------------------- collation

class CharTok(data.BaseTokenizer):
    """Letters a..z -> ids 10..35; bos 2, eos 3, pad 0: hand-checkable. bos: whether its own encoding
    puts the BOS first (Llama 2's tokenizer does, SmolLM2's does not)."""
    bos_id, eos_id, pad_id = 2, 3, 0

    def __init__(self, bos=True):
        self.prefix = [2] if bos else []

    def encode(self, text):
        return [10 + ord(c) - ord("a") for c in text]


def test_collate_without_bos():
    """A tokenizer that adds no BOS: rows start with the prompt itself, its last token predicts the
    response; a prompt cut from the left keeps max_len - 1 tokens; an empty prompt is refused."""
    b = data.collate(CharTok(bos=False), ["ab", "a"], ["cd", "x"], max_len=16)
    assert b["input_ids"].tolist() == [[10, 11, 12, 13, 3], [10, 33, 3, 0, 0]]
    assert b["labels"].tolist() == [[-100, 12, 13, 3, -100], [33, 3, -100, -100, -100]]
    assert b["weights"].tolist() == [[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    b = data.collate(CharTok(bos=False), ["abcde"], ["x"], max_len=4)
    assert b["input_ids"].tolist() == [[12, 13, 14, 33]] and b["labels"].tolist() == [[-100, -100, 33, -100]]
    with_bos = data.collate(CharTok(), [[2, 10, 11]], ["cd"], max_len=16)["input_ids"].tolist()
    assert with_bos == [[2, 10, 11, 12, 13, 3]]  # a prompt that starts with the BOS gets no second one
    with pytest.raises(ValueError, match="empty prompt"):
        data.collate(CharTok(bos=False), [""], ["cd"], max_len=16)


def test_prompt_ids_add_no_second_bos():
    """A prompt that already begins with the BOS (a chat template that writes its own) gets none on top."""
    tok = CharTok()
    assert tok.prompt_ids([2, 10]) == [2, 10] and tok.prompt_ids([10]) == [2, 10]
    assert CharTok(bos=False).prompt_ids([10]) == [10]


def test_collate_hand_checked():
    b = data.collate(CharTok(), ["ab", "a"], ["cd", "x"], max_len=16)
    assert b["input_ids"].tolist() == [[2, 10, 11, 12, 13, 3], [2, 10, 33, 3, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, 12, 13, 3, -100], [-100, 33, 3, -100, -100, -100]]
    assert b["weights"].tolist() == [[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]]
    assert b["n_truncated"] == 0
    assert [b[k].dtype for k in ("input_ids", "attention_mask", "labels", "weights")] == \
        [torch.long, torch.long, torch.long, torch.float32]
    w = data.collate(CharTok(), ["ab", "a"], ["cd", "x"], max_len=16, weights=[[0.5, 0.25], [0.75]])
    assert w["weights"].tolist() == [[0, 0, 0.5, 0.25, 0, 0], [0, 0.75, 0, 0, 0, 0]]
    assert torch.equal(w["labels"], b["labels"])
    pre = data.collate(CharTok(), [[10, 11], [10]], [[12, 13], [33]], max_len=16)  # pre-tokenized
    assert torch.equal(pre["input_ids"], b["input_ids"]) and torch.equal(pre["labels"], b["labels"])
    with pytest.raises(ValueError, match="weights"):
        data.collate(CharTok(), ["ab"], ["cd"], max_len=16, weights=[[1.0]])


def test_collate_truncation_counted():
    # response tail cut: EOS and "d" go; the last kept position has no target
    b = data.collate(CharTok(), ["ab", "a"], ["cde", "x"], max_len=4, weights=[[0.5, 0.25, 1], [0.75]])
    assert b["input_ids"].tolist() == [[2, 10, 11, 12], [2, 10, 33, 3]]
    assert b["labels"].tolist() == [[-100, -100, 12, -100], [-100, 33, 3, -100]]
    assert b["weights"].tolist() == [[0, 0, 0.5, 0], [0, 0.75, 0, 0]]
    assert b["n_truncated"] == 1
    # prompt too long: cut from the left, BOS kept, one target kept
    b = data.collate(CharTok(), ["abcde"], ["x"], max_len=4)
    assert b["input_ids"].tolist() == [[2, 13, 14, 33]]
    assert b["labels"].tolist() == [[-100, -100, 33, -100]]
    assert b["n_truncated"] == 1


def test_collate_with_task_tokenizer(tok):
    ps = task.make_splits(0, 8, 0, 0)["train"]
    rows = [{"input": data.prompt_text(e["question"]), "output": " " + e["answer"]}
            for e in map(task.sft_example, ps)]
    b = data.collate(tok, [r["input"] for r in rows], [r["output"] for r in rows], max_len=256)
    ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
    for i, r in enumerate(rows):
        n_p, n_r = len(tok.encode(r["input"])), len(tok.encode(r["output"]))
        on = labels[i] != -100
        assert on.sum() == n_r + 1 and mask[i].sum() == n_p + n_r + 2
        assert torch.equal(labels[i, :-1][on[:-1]], ids[i, 1:][on[:-1]])  # pre-shifted
        assert tok.decode(labels[i][on]) == r["output"]
        assert torch.equal(b["weights"][i] != 0, on)


def test_two_writers_of_the_embedded_task_leave_it_whole(tmp_path, monkeypatch):
    """A second process (a study side by side) writes the same task while the first is still
    writing: each writes into a folder of its own, and the task ends whole, as one writer leaves it."""
    config = task.TaskConfig(n_train=40, n_val=8, n_test=8)
    folder = str(tmp_path / "task")
    real = task.train_task_tokenizer
    nested = []

    def tokenizer_then_the_other_writer(path, **difficulty):
        if not nested:
            nested.append(True)
            task.write_task(folder, config)  # the other writer, from start to finish
        return real(path, **difficulty)

    monkeypatch.setattr(task, "train_task_tokenizer", tokenizer_then_the_other_writer)
    task.write_task(folder, config)
    monkeypatch.undo()
    alone = str(tmp_path / "alone")
    task.write_task(alone, config)
    assert sorted(os.listdir(tmp_path)) == ["alone", "task"]  # no temporary folder left
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "sft.jsonl", "task.json", "tokenizer.model"):
        assert open(os.path.join(folder, name), "rb").read() == open(os.path.join(alone, name), "rb").read()
    assert task.written_with(folder, config)


def test_a_harder_task_variant_is_deterministic_and_keeps_its_bounds(tmp_path):
    """#35 item 1: more steps, larger numbers, multiplication (TaskConfig's min_steps, max_steps,
    max_operand, max_value, ops), written alike from the same seed; every step of every solution right
    and within the bounds; the default variant is the module's defaults, and a task.json written
    before these settings existed is still the default task."""
    config = task.TaskConfig(n_train=60, n_val=10, n_test=10, min_steps=3, max_steps=4, max_operand=20,
                             max_value=199, ops="+-*")
    for name in ("a", "b"):
        task.write_task(str(tmp_path / name), config)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "sft.jsonl", "tokenizer.model"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    rows = data.read_jsonl(str(tmp_path / "a" / "train.jsonl"), "questions")
    ops = set()
    for r in rows:
        steps = r["answer"].split(". ")[:-1]
        assert 3 <= len(steps) <= 4
        for s in steps:
            a, op, b, _, c = s.split()
            ops.add(op)
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c)
            assert 0 <= int(c) <= 199 and 1 <= int(b) <= 20
    assert ops == {"+", "-", "*"}
    default = task.make_splits(0, 30, 5, 5)  # the module's defaults: the embedded task as it was
    given = dict(min_steps=2, max_steps=3, max_operand=9, max_value=49, ops="+-")
    assert task.make_splits(0, 30, 5, 5, **given) == default
    old = tmp_path / "old"
    task.write_task(str(old), task.TaskConfig(n_train=40, n_val=8, n_test=8))
    written = fileio.read_json(str(old / "task.json"))
    fileio.write_json(str(old / "task.json"), {k: v for k, v in written.items()
                                               if k not in ("min_steps", "max_steps", "ops")})
    assert task.written_with(str(old), task.TaskConfig(n_train=40, n_val=8, n_test=8))
    with pytest.raises(DataError, match="written with ops"):
        task.written_with(str(old), task.TaskConfig(n_train=40, n_val=8, n_test=8, ops="+-*"))
