"""llama.cpp's GGUF files in and out: a GGUF checkpoint becomes a Hugging Face folder the project
reads, and a model folder the project wrote becomes a GGUF file llama.cpp and Ollama run.

`--model FILE.gguf` (train.py) and a FILE.gguf among eval.py's models are converted once, through
the `gguf` package (llama.cpp's own reader; an optional import, as `tokenizers`), into a folder
of the run, <run>/gguf/<name>-<12 hex of the file's hash>/: config.json, model.safetensors,
tokenizer.json, tokenizer_config.json (special tokens, BOS rule, chat template). Then everything
reads that folder as it reads any other model.

- Weights: every tensor type the package can dequantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, the
  K-quants ...) becomes float32. A 4-bit file's weights ARE the dequantized 4-bit values: training
  starts from them, not from the original float weights the file was quantized from.
- llama.cpp's converter permutes the rows of a Llama-family model's q and k projections (for its
  interleaved RoPE); the permutation is undone here. Qwen2 and Qwen3 files are stored unpermuted.
- Hyperparameters from the metadata ({arch}.block_count, .embedding_length, ...); the families of
  model.py: llama, qwen2, qwen3. RoPE scaling and other architectures are refused in one line.
- The tokenizer from the metadata: byte-level BPE vocabularies ("gpt2": SmolLM2, Qwen, Llama 3),
  with the pre-tokenizer the file names (tokenizer.ggml.pre), rebuilt through `tokenizers`, or
  SentencePiece ones ("llama": Llama 2, TinyLlama, the embedded task's), rebuilt as a BPE
  tokenizer.model from the pieces, scores and types (sentencepiece_proto); its BOS, EOS, PAD ids,
  whether it adds BOS, and its chat template.

Out (folder_to_gguf; `python -m tools.export_gguf`): the same mapping backwards, q/k rows permuted
for a Llama-family model, tensors in f32, f16 or q8_0 (norms and biases always f32, as llama.cpp's
converter writes them), with the tokenizer (a byte-level BPE tokenizer.json), its special ids and
chat template; a SentencePiece tokenizer.model as its pieces, scores, types and dummy prefix.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import torch

from bookkeeping.fileio import replace_dir
from data import DataError, load_tokenizer
from model import ModelConfig, Transformer

ARCHS = ("llama", "qwen2", "qwen3")

# tokenizer.ggml.pre -> how its text is split before byte-level BPE: None, GPT-2's own split (the
# ByteLevel pre-tokenizer's regex); a string, that regex (the model's own tokenizer.json's), then
# ByteLevel without one. The names are llama.cpp's.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"default": None, "gpt2": None, "smollm": None, "llama-bpe": LLAMA3_SPLIT,
                  "qwen2": QWEN2_SPLIT}  # one name per regex: the writer names a split by it

# GGUF tensor name (after "blk.N.") -> the model's parameter name (after "layers.N.")
BLOCK_NAMES = {"attn_norm.weight": "input_layernorm.weight",
               "ffn_norm.weight": "post_attention_layernorm.weight",
               "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
               "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
               "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
               "attn_v.bias": "self_attn.v_proj.bias", "attn_q_norm.weight": "self_attn.q_norm.weight",
               "attn_k_norm.weight": "self_attn.k_norm.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
               "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}
TOP_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
             "output.weight": "lm_head.weight"}


def gguf_module(path):
    try:
        import gguf
    except ImportError:
        raise DataError(f"{path}: a GGUF file needs the `gguf` package: pip install gguf") from None
    return gguf


def model_folder(path, run):
    """The model folder of `path`: itself, or for a .gguf file its conversion in
    <run>/gguf/<name>-<hash>/, made once (atomically) and reused."""
    if not str(path).endswith(".gguf") or os.path.isdir(path):
        return path
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such GGUF file")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    folder = os.path.join(run, "gguf", f"{os.path.basename(path)[:-5]}-{digest.hexdigest()[:12]}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        print(f"gguf: converting {path} into {folder}", flush=True)
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            gguf_to_folder(path, tmp)
        except BaseException:  # nothing half-written stays behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, folder)
    return folder


def gguf_to_folder(path, folder):
    """Write the GGUF checkpoint `path` into `folder` as a Hugging Face folder (see the module)."""
    gguf = gguf_module(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises what numpy and struct raise on a bad file
        raise DataError(f"{path}: not a GGUF file ({type(e).__name__}: {str(e)[:80]})") from None
    meta = {k: field.contents() for k, field in reader.fields.items()
            if not k.startswith("tokenizer.ggml.") or k in SCALAR_TOKENIZER_FIELDS}
    cfg = config_of(path, meta, vocab=len(reader.fields["tokenizer.ggml.tokens"].data)
                    if "tokenizer.ggml.tokens" in reader.fields else None)
    weights = {}
    for t in reader.tensors:
        name = parameter_name(path, t.name)
        values = gguf.quants.dequantize(t.data, t.tensor_type)  # float32, numpy's [rows, cols]
        weights[name] = torch.from_numpy(np.array(values, dtype=np.float32))  # a writable copy
    if cfg.arch == "llama":  # undo llama.cpp's q/k row permutation
        for name in [n for n in weights if n.endswith(("q_proj.weight", "k_proj.weight"))]:
            heads = cfg.n_heads if name.endswith("q_proj.weight") else cfg.n_kv_heads
            weights[name] = unpermute(weights[name], heads)
    tied = "lm_head.weight" not in weights
    cfg.tie_embeddings = tied
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in Transformer(cfg).named_parameters()}
    got = {n: tuple(w.shape) for n, w in weights.items()}
    if got != expected:
        wrong = sorted(set(got.items()) ^ set(expected.items()))[:3]
        raise DataError(f"{path}: its tensors are not those of a {cfg.arch} model of its metadata: {wrong}")
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(weights, assign=True)
    ids = write_tokenizer(path, reader, meta, folder)
    model.save_pretrained(folder, **ids)


SCALAR_TOKENIZER_FIELDS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                           "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                           "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix",
                           "tokenizer.ggml.unknown_token_id")


def config_of(path, meta, vocab):
    """The ModelConfig a GGUF file's metadata describes."""
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise DataError(f"{path}: general.architecture {arch!r}: this project runs {', '.join(ARCHS)}")
    if meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", None) or \
            meta.get(f"{arch}.rope.scaling.factor") not in (None, 1.0):
        raise DataError(f"{path}: RoPE scaling ({meta.get(f'{arch}.rope.scaling.type')}) is not read from "
                        "GGUF files yet")
    need = {k: meta.get(f"{arch}.{k}") for k in ("block_count", "embedding_length", "feed_forward_length",
                                                 "attention.head_count")}
    missing = [k for k, v in need.items() if not isinstance(v, int) or v <= 0]
    if missing:
        raise DataError(f"{path}: metadata {', '.join(f'{arch}.{k}' for k in missing)} missing or not a "
                        "positive integer")
    heads, dim = need["attention.head_count"], need["embedding_length"]
    head_dim = meta.get(f"{arch}.attention.key_length", dim // heads)
    return ModelConfig(vocab_size=meta.get(f"{arch}.vocab_size", vocab) or vocab, dim=dim,
                       n_layers=need["block_count"], n_heads=heads,
                       n_kv_heads=meta.get(f"{arch}.attention.head_count_kv", heads),
                       hidden_dim=need["feed_forward_length"],
                       norm_eps=decimal(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
                       rope_theta=decimal(meta.get(f"{arch}.rope.freq_base", 10000.0)),
                       max_seq_len=meta.get(f"{arch}.context_length", 2048), arch=arch,
                       qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
                       head_size=head_dim if head_dim != dim // heads else None)


def decimal(x):
    """A float32 of the metadata as the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06): the value the file was written from."""
    return float(str(np.float32(x)))


def parameter_name(path, name):
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    parts = name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in BLOCK_NAMES:
        return f"layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}"
    raise DataError(f"{path}: tensor {name!r} is not one of the llama, qwen2 or qwen3 tensors this "
                    "project reads (rope_freqs: Llama 3 RoPE scaling, not read yet)")


def unpermute(w, heads):
    """Undo llama.cpp's q/k permutation: its converter lays each head's rows (i, i + hd/2) as
    (2i, 2i + 1) for its interleaved RoPE; model.py (and Hugging Face) use the halves."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute(w, heads):
    """llama.cpp's permutation of q/k rows (the inverse of unpermute), for writing GGUF files."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tokenizer(path, reader, meta, folder):
    """tokenizer.json and tokenizer_config.json in `folder` from the GGUF metadata; returns the
    special ids for config.json."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        return write_sentencepiece(path, reader, meta, folder)
    if kind != "gpt2":
        raise DataError(f"{path}: tokenizer.ggml.model {kind!r}: byte-level BPE ('gpt2') and SentencePiece "
                        "('llama') vocabularies are read from GGUF files")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise DataError(f"{path}: tokenizer.ggml.pre {pre!r}: its pre-tokenizer is not known here (known: "
                        f"{', '.join(PRE_TOKENIZERS)})")
    try:
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    except ImportError:
        raise DataError(f"{path}: a GGUF file's tokenizer needs the `tokenizers` package: pip install "
                        "tokenizers") from None
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    fields = reader.fields
    merges = fields["tokenizer.ggml.merges"].contents() if "tokenizer.ggml.merges" in fields else []
    types = fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in fields else \
        [1] * len(tokens)
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                              merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=False))
    split = PRE_TOKENIZERS[pre]
    if split is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tk.normalizer = normalizers.NFC() if pre == "qwen2" else None
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    special = [t for t, ty in zip(tokens, types) if ty in (3, 4)]  # llama.cpp's CONTROL, USER_DEFINED
    tk.add_special_tokens(special)
    ids = special_ids(meta)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and ids["bos_token_id"] is not None
    bos = tokens[ids["bos_token_id"]] if ids["bos_token_id"] is not None else None
    if add_bos:  # BOS in front of a text where the file says its tokenizer adds one
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                          special_tokens=[(bos, ids["bos_token_id"])])
    tk.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos,
              **{k[:-3]: tokens[i] for k, i in ids.items() if i is not None}}
    if "tokenizer.chat_template" in reader.fields:
        config["chat_template"] = reader.fields["tokenizer.chat_template"].contents()
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return {k: v for k, v in ids.items() if v is not None}


def special_ids(meta):
    """config.json's special ids from the GGUF metadata (None where the file names none)."""
    return {k: meta.get(f"tokenizer.ggml.{g}_token_id") for k, g in (("bos_token_id", "bos"),
                                                                     ("eos_token_id", "eos"),
                                                                     ("pad_token_id", "padding"))}


def write_sentencepiece(path, reader, meta, folder):
    """A "llama" (SentencePiece) vocabulary as tokenizer.model + tokenizer_config.json."""
    fields = reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = (fields["tokenizer.ggml.scores"].contents() if "tokenizer.ggml.scores" in fields
              else [0.0] * len(tokens))
    types = fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in fields else \
        [1] * len(tokens)
    ids = special_ids(meta)
    unk = meta.get("tokenizer.ggml.unknown_token_id", next((i for i, t in enumerate(types) if t == 2), 0))
    proto = sentencepiece_proto(tokens, scores, types, unk=unk, bos=ids["bos_token_id"],
                                eos=ids["eos_token_id"], pad=ids["pad_token_id"],
                                dummy_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(proto)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": add_bos, "add_eos_token": False,
              **{k[:-3]: tokens[i] for k, i in ids.items() if i is not None}}
    if "tokenizer.chat_template" in fields:
        config["chat_template"] = fields["tokenizer.chat_template"].contents()
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return {k: v for k, v in ids.items() if v is not None}


def sentencepiece_proto(pieces, scores, types, *, unk, bos, eos, pad, dummy_prefix):
    """A SentencePiece ModelProto (sentencepiece_model.proto, wire format written out here: no
    protobuf package) of a BPE model: the pieces with their scores and types (1 normal, 2 unknown,
    3 control, 4 user-defined, 6 byte), the special ids (None: -1), byte fallback where byte
    pieces exist, the identity normalizer with or without a dummy prefix."""
    def varint(n):
        n &= (1 << 64) - 1  # negative int32s as ten bytes, as protobuf writes them
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    def field(number, value):  # int -> varint (wire type 0), float -> fixed32 (5), bytes/str (2)
        if isinstance(value, float):
            return varint(number << 3 | 5) + np.float32(value).tobytes()
        if isinstance(value, int):
            return varint(number << 3) + varint(value)
        value = value.encode() if isinstance(value, str) else value
        return varint(number << 3 | 2) + varint(len(value)) + value

    out = b"".join(field(1, field(1, p) + field(2, float(s)) + field(3, int(t)))
                   for p, s, t in zip(pieces, scores, types))
    spec = [(3, 2), (4, len(pieces)), (35, int(any(int(t) == 6 for t in types))), (40, unk),  # 3: BPE
            *((n, -1 if i is None else i) for n, i in ((41, bos), (42, eos), (43, pad)))]
    out += field(2, b"".join(field(n, v) for n, v in spec))
    return out + field(3, field(1, "identity") + field(3, int(dummy_prefix)) + field(4, 0) + field(5, 1))
    # (NormalizerSpec: 1 name, 3 add_dummy_prefix, 4 remove_extra_whitespaces, 5 escape_whitespaces)


# ----------------------------------------------------------------------------- out

TYPES = ("f32", "f16", "q8_0")
HYPERPARAMETERS = (  # GGUF's {arch}.<key> (GGUFWriter.add_<key>) <- the ModelConfig field
    ("block_count", "n_layers"), ("context_length", "max_seq_len"), ("embedding_length", "dim"),
    ("feed_forward_length", "hidden_dim"), ("head_count", "n_heads"), ("head_count_kv", "n_kv_heads"),
    ("key_length", "head_dim"), ("value_length", "head_dim"), ("rope_dimension_count", "head_dim"),
    ("rope_freq_base", "rope_theta"), ("layer_norm_rms_eps", "norm_eps"), ("vocab_size", "vocab_size"))


def folder_to_gguf(folder, out, qtype="f16"):
    """Write the model folder `folder` (a stage's output: config.json, model.safetensors, a
    byte-level BPE tokenizer.json or a SentencePiece tokenizer.model) as the GGUF file `out`: 2-D
    weights as qtype (f32, f16 or q8_0), 1-D ones (norms, biases) as f32. Written to <out>.tmp and
    renamed when complete."""
    gguf = gguf_module(out)
    if qtype not in TYPES:
        raise DataError(f"--type {qtype!r}: one of {', '.join(TYPES)}")
    model = Transformer.from_pretrained(folder)
    cfg, arch = model.cfg, model.cfg.arch
    if cfg.rope_scaling is not None:
        raise DataError(f"{folder}: Llama 3 RoPE scaling is not written to GGUF files yet")
    tmp = out + ".tmp"
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(os.path.basename(os.path.normpath(folder)))
        for key, field in HYPERPARAMETERS:  # {arch}.<key> = the config's field
            getattr(w, f"add_{key}")(getattr(cfg, field))
        kinds = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                 "q8_0": gguf.GGMLQuantizationType.Q8_0}
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
        write_tokenizer_fields(w, folder, cfg.vocab_size)
        names = {v: k for k, v in TOP_NAMES.items()}
        for name, p in model.named_parameters():
            x = p.detach().float()
            if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                x = permute(x, cfg.n_heads if name.endswith("q_proj.weight") else cfg.n_kv_heads)
            if name.startswith("layers."):
                _, i, rest = name.split(".", 2)
                target = f"blk.{i}." + next(k for k, v in BLOCK_NAMES.items() if v == rest)
            else:
                target = names[name]
            kind = kinds[qtype] if x.ndim == 2 else kinds["f32"]
            if kind == kinds["q8_0"] and x.shape[-1] % 32:  # q8_0 blocks of 32 along a row
                kind = kinds["f16"]
            data = x.numpy()
            if kind != kinds["f32"]:
                data = data.astype(np.float16) if kind == kinds["f16"] else gguf.quants.quantize(data, kind)
            w.add_tensor(target, data, raw_dtype=kind)  # the writer infers a quantized tensor's shape
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    except BaseException:  # no half-written file stays behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, out)


def write_tokenizer_fields(w, folder, vocab_size):
    """The tokenizer of `folder` (a byte-level BPE tokenizer.json or a SentencePiece
    tokenizer.model) as GGUF metadata."""
    tok = load_tokenizer(folder)
    if tok.path.endswith("tokenizer.model"):
        write_sentencepiece_fields(w, tok, vocab_size)
    else:
        write_bpe_fields(w, tok.path, vocab_size)
    for add, i in ((w.add_bos_token_id, tok.bos_id), (w.add_eos_token_id, tok.eos_id),
                   (w.add_pad_token_id, tok.pad_id)):
        if i is not None:
            add(i)
    w.add_add_bos_token(bool(tok.prefix))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def write_sentencepiece_fields(w, tok, vocab_size):
    """A SentencePiece model's pieces, scores and types (llama.cpp's "llama" vocabulary)."""
    sp, n = tok.sp, tok.sp.vocab_size()
    with open(tok.path, "rb") as f:
        spec = [v for k, v in proto_fields(f.read()) if k == 3]
    norm = dict(proto_fields(spec[0])) if spec else {}  # NormalizerSpec: 1 name, 4 remove_extra_whitespaces
    if norm.get(1, b"identity") != b"identity" or norm.get(4, 1):  # llama.cpp normalizes nothing
        raise DataError(f"{tok.path}: its normalizer ({norm.get(1, b'').decode()}, removing extra "
                        f"whitespace: {bool(norm.get(4, 1))}) cannot be written to a GGUF file, which "
                        "normalizes nothing (Llama 2's: identity, keeping whitespace)")
    if n != vocab_size:
        raise DataError(f"{tok.path}: {n} pieces for an embedding of {vocab_size}: a SentencePiece "
                        "vocabulary is written to GGUF only as large as the model's")
    mine = user_defined(tok.path)
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
             4 if sp.id_to_piece(i) in mine else 1 for i in range(n)]  # llama.cpp's token types
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(kinds)
    w.add_unk_token_id(sp.unk_id())
    w.add_add_space_prefix(normalizer_flag(tok.path, 3, default=True))


def write_bpe_fields(w, path, vocab_size):
    """A byte-level BPE tokenizer.json's vocabulary, merges and pre-tokenizer (llama.cpp's "gpt2")."""
    with open(path) as f:
        spec = json.load(f)
    bpe, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if bpe.get("type") != "BPE":
        raise DataError(f"{path}: a {bpe.get('type')} tokenizer; only byte-level BPE is written to GGUF "
                        "files")
    split = [p for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
    regex = split[0]["pattern"].get("Regex") if split else None
    names = {v: k for k, v in PRE_TOKENIZERS.items() if v is not None}
    if regex is None and pre.get("type") == "ByteLevel":
        w.add_tokenizer_pre("gpt2")
    elif regex in names:
        w.add_tokenizer_pre(names[regex])
    else:
        raise DataError(f"{path}: its pre-tokenizer is none of those llama.cpp names here "
                        f"({', '.join(PRE_TOKENIZERS)})")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens = [""] * vocab_size
    for token, i in {**bpe["vocab"], **{t["content"]: i for i, t in added.items()}}.items():
        if i < vocab_size:
            tokens[i] = token
    for i, t in enumerate(tokens):  # ids the tokenizer leaves out (an embedding larger than it)
        tokens[i] = t or f"[PAD{i}]"
    types = [3 if i in added and added[i].get("special") else 4 if i in added else 1  # llama.cpp's types:
             for i in range(vocab_size)]  # control, user-defined, normal
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])])


def proto_fields(data):
    """The (field number, value) pairs of a protobuf message: varints as ints, the rest as bytes."""
    out, i = [], 0
    while i < len(data):
        key, i = read_varint(data, i)
        if key & 7 == 0:
            value, i = read_varint(data, i)
        elif key & 7 == 2:
            n, i = read_varint(data, i)
            value, i = data[i:i + n], i + n
        else:  # fixed32 (5) or fixed64 (1)
            value, i = data[i:i + (4 if key & 7 == 5 else 8)], i + (4 if key & 7 == 5 else 8)
        out.append((key >> 3, value))
    return out


def read_varint(data, i):
    value = shift = 0
    while True:
        byte = data[i]
        value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
        if byte < 0x80:
            return value, i


def normalizer_flag(path, number, default):
    """A boolean of a tokenizer.model's NormalizerSpec (3: add_dummy_prefix)."""
    with open(path, "rb") as f:
        spec = [v for n, v in proto_fields(f.read()) if n == 3]
    flags = [v for n, v in proto_fields(spec[0]) if n == number] if spec else []
    return bool(flags[0]) if flags else default


def user_defined(path):
    """The pieces a tokenizer.model declares user-defined (its TrainerSpec's user_defined_symbols)."""
    with open(path, "rb") as f:
        spec = [v for n, v in proto_fields(f.read()) if n == 2]
    return {v.decode() for n, v in (proto_fields(spec[0]) if spec else []) if n == 31}
