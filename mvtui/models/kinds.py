"""Whether a cached model generates text or makes embeddings, from its config.json and files.

vLLM picks its runner the same way, from the architecture's name: `...ForCausalLM` and
`...ForConditionalGeneration` generate; a bare `...Model` (BertModel, XLMRobertaModel) pools
hidden states into embeddings. A sentence-transformers folder is an embedding model whatever
its architecture (Qwen3-Embedding is a `Qwen3ForCausalLM` underneath).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

GENERATION = "generation"
EMBEDDING = "embedding"
CLASSIFICATION = "classification"
UNKNOWN = "unknown"

SENTENCE_TRANSFORMERS_FILES = frozenset({"modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"})
GENERATION_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel", "ForSeq2SeqLM", "ForVision2Seq", "ForImageTextToText")
CLASSIFICATION_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForRewardModel", "ForRewardModeling")
EMBEDDING_SUFFIXES = ("Model", "ForMaskedLM")
ENCODER_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "nomic_bert", "electra", "deberta", "deberta-v2", "modernbert", "gte", "new"}
)


def model_kind(config: Mapping[str, Any] | None, file_names: Iterable[str] = ()) -> str:
    """`generation`, `embedding`, `classification` or `unknown` (no config.json, say a GGUF repo)."""
    if SENTENCE_TRANSFORMERS_FILES & {name.rsplit("/", 1)[-1] for name in file_names}:
        return EMBEDDING
    if not config:
        return UNKNOWN
    for architecture in _architectures(config):
        kind = architecture_kind(architecture)
        if kind != UNKNOWN:
            return kind
    return EMBEDDING if str(config.get("model_type", "")).lower() in ENCODER_TYPES else UNKNOWN


def architecture_kind(architecture: str) -> str:
    if "Embedding" in architecture:
        return EMBEDDING
    if architecture.endswith(GENERATION_SUFFIXES):
        return GENERATION
    if architecture.endswith(CLASSIFICATION_SUFFIXES):
        return CLASSIFICATION
    if architecture.endswith(EMBEDDING_SUFFIXES):
        return EMBEDDING
    return UNKNOWN


def _architectures(config: Mapping[str, Any]) -> list[str]:
    found = config.get("architectures")
    if not isinstance(found, list):
        return []
    return [name for name in found if isinstance(name, str)]
