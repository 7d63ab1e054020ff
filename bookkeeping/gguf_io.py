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
  with the pre-tokenizer the file names (tokenizer.ggml.pre), rebuilt through `tokenizers`; its
  BOS, EOS, PAD ids, whether it adds BOS, and its chat template. SentencePiece ("llama")
  vocabularies are refused in one line for now.

Out (folder_to_gguf; `python -m tools.export_gguf`): the same mapping backwards, q/k rows permuted
for a Llama-family model, tensors in f32, f16 or q8_0 (norms and biases always f32, as llama.cpp's
converter writes them), with the tokenizer (a byte-level BPE tokenizer.json), its special ids and
chat template.
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
                  "llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}

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
                           "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix")


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
    if kind != "gpt2":
        raise DataError(f"{path}: tokenizer.ggml.model {kind!r}: only byte-level BPE vocabularies ('gpt2': "
                        "SmolLM2, Qwen, Llama 3) are read from GGUF files yet")
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
    ids = {k: meta.get(f"tokenizer.ggml.{g}_token_id") for k, g in (("bos_token_id", "bos"),
                                                                   ("eos_token_id", "eos"),
                                                                   ("pad_token_id", "padding"))}
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


# ----------------------------------------------------------------------------- out

TYPES = ("f32", "f16", "q8_0")


def folder_to_gguf(folder, out, qtype="f16"):
    """Write the model folder `folder` (a stage's output: config.json, model.safetensors, a byte-level
    BPE tokenizer.json) as the GGUF file `out`: 2-D weights as qtype (f32, f16 or q8_0), 1-D ones
    (norms, biases) as f32. Written to <out>.tmp and renamed when complete."""
    gguf = gguf_module(out)
    if qtype not in TYPES:
        raise DataError(f"--type {qtype!r}: one of {', '.join(TYPES)}")
    model = Transformer.from_pretrained(folder)
    cfg, arch = model.cfg, model.cfg.arch
    tmp = out + ".tmp"
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name(os.path.basename(os.path.normpath(folder)))
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.rope_scaling is not None:
        raise DataError(f"{folder}: Llama 3 RoPE scaling is not written to GGUF files yet")
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
        data = (x.numpy() if kind == kinds["f32"] else x.numpy().astype(np.float16) if kind == kinds["f16"]
                else gguf.quants.quantize(x.numpy(), kind))
        w.add_tensor(target, data, raw_dtype=kind)  # the writer infers a quantized tensor's shape
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)


def write_tokenizer_fields(w, folder, vocab_size):
    """The tokenizer of `folder` (tokenizer.json, byte-level BPE) as GGUF metadata."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise DataError(f"{folder}: only a tokenizer.json (byte-level BPE) is written to GGUF files yet; a "
                        "SentencePiece tokenizer.model is not")
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
    tok = load_tokenizer(folder)
    for add, i in ((w.add_bos_token_id, tok.bos_id), (w.add_eos_token_id, tok.eos_id),
                   (w.add_pad_token_id, tok.pad_id)):
        if i is not None:
            add(i)
    w.add_add_bos_token(bool(tok.prefix))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
