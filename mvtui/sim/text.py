"""A cheap, deterministic stand-in for a tokenizer and a model's outputs.

Tokens are 3-byte slices of the UTF-8 text (about three characters per token, close to
real tokenizers on English) with reversible ids, so /tokenize and /detokenize round-trip.
Generated text is drawn word by word from a small vocabulary, one word per token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import struct
from collections.abc import Iterable, Sequence

BYTES_PER_TOKEN = 3
# Token ids: 1-byte pieces use 0..255, 2-byte pieces 256.., 3-byte pieces after those.
_ID_OFFSET = {1: 0, 2: 1 << 8, 3: (1 << 8) + (1 << 16)}

VOCABULARY: tuple[str, ...] = tuple(
    " " + word
    for word in (
        "the model tokens cluster server request latency queue batch cache prefix decode prefill "
        "router stream sleep wake GPU memory weights kernel tensor layer attention context window "
        "throughput scheduler engine block replica balance health metric sample token vector score "
        "a of to and in is that for on with as it by this are be at or from fast slow quiet busy "
        "ready"
    ).split()
)
# Words pre-encoded as JSON strings: streaming a token then costs no json.dumps call.
VOCABULARY_JSON: tuple[str, ...] = tuple(json.dumps(word) for word in VOCABULARY)


def count_tokens(text: str) -> int:
    return math.ceil(len(text.encode()) / BYTES_PER_TOKEN)


def encode(text: str) -> list[int]:
    data = text.encode()
    pieces = (data[i : i + BYTES_PER_TOKEN] for i in range(0, len(data), BYTES_PER_TOKEN))
    return [_ID_OFFSET[len(piece)] + int.from_bytes(piece, "big") for piece in pieces]


def decode(token_ids: Iterable[int]) -> str:
    data = bytearray()
    for token_id in token_ids:
        data += _piece_of(token_id)
    return data.decode(errors="replace")


def token_strings(token_ids: Iterable[int]) -> list[str]:
    return [_piece_of(token_id).decode(errors="replace") for token_id in token_ids]


def _piece_of(token_id: int) -> bytes:
    for length in (3, 2, 1):
        if token_id >= _ID_OFFSET[length]:
            value = token_id - _ID_OFFSET[length]
            if value >= 1 << (8 * length):
                raise ValueError(f"token id {token_id} is out of the vocabulary")
            return value.to_bytes(length, "big")
    raise ValueError(f"token id {token_id} is out of the vocabulary")


def sample_words(seed: int, count: int) -> list[int]:
    """Indices into VOCABULARY for `count` generated tokens."""
    return random.Random(seed).choices(range(len(VOCABULARY)), k=count)


def stop_position(word_indices: Sequence[int], stop: Sequence[str]) -> int | None:
    """Index of the first generated word that contains a stop string, if any."""
    needles = [s.strip() for s in stop if s.strip()]
    if not needles:
        return None
    for position, index in enumerate(word_indices):
        if any(needle in VOCABULARY[index] for needle in needles):
            return position
    return None


def words_text(word_indices: Iterable[int]) -> str:
    return "".join(VOCABULARY[i] for i in word_indices)


def stable_seed(*parts: object) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def embedding(text: str, dimensions: int) -> list[float]:
    """A unit vector that depends only on the text: same input, same vector."""
    rng = random.Random(stable_seed("embedding", text))
    vector = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def embedding_base64(vector: Sequence[float]) -> str:
    """The float32 little-endian encoding OpenAI clients ask for by default."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def relevance(query: str, document: str) -> float:
    """A score in 0..1: shared words raise it, a small hash jitter breaks ties."""
    query_words, doc_words = set(query.lower().split()), set(document.lower().split())
    overlap = len(query_words & doc_words) / max(1, len(query_words | doc_words))
    jitter = (stable_seed("score", query, document) % 1000) / 10000.0
    return round(min(1.0, 0.05 + 0.85 * overlap + jitter), 6)
