"""Run bookkeeping and the command line, apart from the method: output folders, locks, fingerprints
and resume (runs), atomic writes (fileio), flags made from
configs (flags), torchrun helpers (parallel), and MaskedAdamW's multi-tensor twin for GPUs (optim).
A reader who comes to learn ALLO can skip this folder."""
