"""Token data: a deterministic synthetic stream, or a memory-mapped file of token ids.

File format (``data.kind: memmap``): a NumPy ``.npy`` file holding a 1-D array of integer token ids
(uint16 or uint32), read with ``mmap_mode="r"``; or a raw little-endian ``.bin`` of ``data.dtype``.
Sample ``i`` of a run is the window ``[i*S, i*S + S + 1)`` (inputs and next-token labels), taken in a
seeded permutation; step s reads samples ``[s*G, (s+1)*G)`` (G the global batch), micro-batch m of
data-parallel rank d the ``mb`` of them from ``s*G + (m*DP + d)*mb`` on, so every sample of a step
is read once and a resumed run continues with exactly the samples it would have seen.

Make a small file: ``python -m ep_train.train.data --out data/sample.npy --tokens 200000 --vocab 512``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

__all__ = ["TokenSource", "SyntheticTokens", "MemmapTokens", "make_sample"]


class TokenSource:
    """Yields ``(tokens [B, S], labels [B, S])`` int64 for global sample indices."""

    seq_length: int

    def batch(self, sample_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.window(i) for i in sample_ids]).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def window(self, sample_id: int) -> np.ndarray:
        raise NotImplementedError


class SyntheticTokens(TokenSource):
    """A learnable synthetic language: a fixed random successor table (seeded) picks the next token
    with probability 0.85, otherwise it is uniform.  A model that learns the table reaches a loss
    near 0.85 * 0 + entropy of the noise (about 1.4 nats at vocab 512), far below ``log(vocab)``."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int):
        self.vocab_size, self.seq_length, self.seed = vocab_size, seq_length, seed
        self.successor = np.random.default_rng((seed, 0x5EED)).permutation(vocab_size)

    def window(self, sample_id: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, sample_id))
        out = np.empty(self.seq_length + 1, dtype=np.int64)
        out[0] = rng.integers(0, self.vocab_size)
        noise = rng.random(self.seq_length) >= 0.85
        random_tokens = rng.integers(0, self.vocab_size, size=self.seq_length)
        for i in range(self.seq_length):
            out[i + 1] = random_tokens[i] if noise[i] else self.successor[out[i]]
        return out


class MemmapTokens(TokenSource):
    """Windows of a token-id file, visited in a seeded permutation (wraps around when exhausted)."""

    def __init__(self, path: str, seq_length: int, seed: int, dtype: str = "uint16", vocab_size: int | None = None):
        if path.endswith(".npy"):
            self.tokens = np.load(path, mmap_mode="r")
        else:
            item = np.dtype(dtype).itemsize
            if os.path.getsize(path) % item:
                raise ValueError(f"data.path: {path} has {os.path.getsize(path)} bytes, not a whole number of "
                                 f"data.dtype={dtype} ids ({item} bytes each)")  # fmt: skip
            self.tokens = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")
        if not np.issubdtype(self.tokens.dtype, np.integer):
            raise ValueError(f"data.path: {path} must hold integer token ids, got dtype {self.tokens.dtype}")
        if self.tokens.ndim != 1:
            raise ValueError(f"data.path: {path} must hold a 1-D array of token ids, got shape {self.tokens.shape}")
        self.seq_length = seq_length
        self.num_windows = (len(self.tokens) - 1) // seq_length
        if self.num_windows < 1:
            raise ValueError(f"data.path: {path} has {len(self.tokens)} tokens, fewer than seq_length+1")
        #: the vocabulary each window read is checked against (None: checked when opened, or every id fits)
        self._window_vocab = None
        info = np.iinfo(self.tokens.dtype)
        if vocab_size is not None and (info.min < 0 or info.max >= vocab_size):  # else every id fits
            if len(self.tokens) <= self.SCAN_AT_START:
                _check_ids(self.tokens, 0, vocab_size)
            else:
                self._window_vocab = vocab_size
        self.order = np.random.default_rng(seed).permutation(self.num_windows)

    #: files of at most this many ids are checked whole when opened; larger ones window by window as
    #: they are read (a scan of a large corpus would delay every rank's start by minutes).
    SCAN_AT_START = 1 << 30

    def window(self, sample_id: int) -> np.ndarray:
        w = int(self.order[sample_id % self.num_windows])
        start = w * self.seq_length
        out = np.asarray(self.tokens[start : start + self.seq_length + 1])
        if self._window_vocab is not None:
            _check_ids(out, start, self._window_vocab)
        return out


def _check_ids(ids: np.ndarray, offset: int, vocab_size: int) -> None:
    """Raise naming the first id of ``ids`` (at file position ``offset``) outside the vocabulary: it
    would otherwise fail deep in the embedding."""
    chunk = 1 << 24
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        low, high = int(part.min()), int(part.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            at = offset + start + int(np.argmax(part == bad))
            raise ValueError(f"data.path: token id {bad} at position {at} is outside [0, "
                             f"model.vocab_size={vocab_size})")  # fmt: skip


def make_sample(out: str, num_tokens: int, vocab_size: int, seed: int = 0) -> str:
    """Write a ``.npy`` token file of the synthetic language of :class:`SyntheticTokens`."""
    src = SyntheticTokens(vocab_size, 63, seed)
    dtype = np.uint16 if vocab_size <= 65536 else np.uint32
    chunks, total, i = [], 0, 0
    while total < num_tokens:
        chunks.append(src.window(i)[:-1])
        total += 63
        i += 1
    arr = np.concatenate(chunks)[:num_tokens].astype(dtype)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.save(out, arr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a small token-id dataset (.npy) for data.kind=memmap.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_sample(args.out, args.tokens, args.vocab, args.seed))


if __name__ == "__main__":
    main()
