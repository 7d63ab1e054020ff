"""Reference log-probs kept on disk by content: a reference pass (trainer.reference_logps) runs once for
a given reference model, rows and settings, and every later stage, rerun or study arm that needs the
same one reads it back (TRL's precompute_ref_log_probs, kept across runs).

The key is a sha256 of everything that changes the numbers, to the bit:
  - the reference model's identity (runs.input_id: a hash of the files that make it);
  - the token ids of every row, prompt and response (so the data, the prompt template, the BOS rule
    and the tokenizer);
  - max_len (the cut), the pass's rows per batch, the number of processes and packing (which rows
    share a batch, padded or packed);
  - the device kind, the precision and torch's version (runs.machine).
A changed key is another file, so it is computed again. <cache>/ref_logps/<key>.safetensors holds every
row's log-probs end to end and each row's length; it is written under a temporary name and renamed, so
a reader finds it whole or not at all. Deleting the folder is always safe: it only costs the passes.
"""

import hashlib
import json
import os
from array import array

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bookkeeping import parallel
from bookkeeping.runs import machine


class RefCache:
    """The cache entry of one reference pass. folder None: no cache (load() misses, save() does nothing)."""

    def __init__(self, folder, model_id, prompts, responses, max_len, batch_size, device, pack=False):
        about = {"model": model_id, "rows": len(prompts), "max_len": max_len, "batch_size": batch_size,
                 "processes": parallel.world(), **machine(device)}
        if pack:  # only then: the keys of padded passes stay those of the caches already written
            about["pack"] = True
        h = hashlib.sha256(json.dumps(about, sort_keys=True).encode())
        for ids in (*prompts, *responses):
            h.update(len(ids).to_bytes(8, "little"))  # the length first: rows cannot run into each other
            h.update(array("q", ids).tobytes())
        self.about, self.device, self.n = about, device, len(prompts)
        self.path = folder and os.path.join(folder, "ref_logps", h.hexdigest()[:32] + ".safetensors")

    def load(self):
        """The cached per-row log-probs (CPU float32 1-D tensors, in row order), or None. Every process
        decides alike: a hit only where every process finds the file."""
        found = bool(self.path) and os.path.isfile(self.path)
        if parallel.world() > 1:
            found = int(parallel.all_reduce_sum(torch.tensor([int(found)], device=self.device))) == \
                parallel.world()
        if not found:
            return None
        try:
            t = load_file(self.path)
            logps, lengths = t["logps"], t["lengths"]
            if len(lengths) != self.n or int(lengths.sum()) != len(logps):
                raise ValueError("its lengths do not match its rows")
        except (OSError, SafetensorError, KeyError, ValueError) as e:  # e.g. a disk that filled up earlier
            print(f"warning: {self.path}: unreadable ({e}); the reference pass runs again")
            return None
        return list(logps.split(lengths.tolist()))

    def save(self, rows):
        """Keep the pass's rows (rank 0 writes). A cache that cannot be written is a warning, not a stop."""
        if not self.path or not parallel.is_main():
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tensors = {"logps": torch.cat(rows) if rows else torch.zeros(0),
                       "lengths": torch.tensor([len(r) for r in rows], dtype=torch.long)}
            save_file(tensors, tmp, metadata={"about": json.dumps(self.about)})
            os.replace(tmp, self.path)  # whole or absent
        except (OSError, SafetensorError) as e:
            print(f"warning: {self.path}: not cached ({e})")
            if os.path.exists(tmp):
                os.remove(tmp)
