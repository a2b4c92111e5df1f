"""A decoder LLM (any transformers causal LM, e.g. SmolLM2) with PEFT LoRA, as a classifier over answer log-likelihoods.

Multiple choice the way lm-evaluation-harness scores it: each example becomes a prompt, each class an answer,
and a class's score is the log-likelihood of its answer tokens given the prompt (their sum; `answer_score="mean"`
divides by the answer's length). The class prompts a task already has ("This message ... means: {}.") give
both: their shared start (cut at a word boundary) ends the prompt, the rest of each is that class's answer.

    user:      {text}                                                (the tokenizer's chat template, if any;
    assistant: This message to a COVID-19 chatbot means:| donate.     list_choices adds "Choose one of: ...")
                                   (prompt | answer of class "donate")

    scores[b, c] = sum_k log p(answer_c[k] | prompt_b, answer_c[:k])

One forward per example scores every class: the prompt is followed by all the answers, packed, with a
4D attention mask that lets each answer token see the prompt and the earlier tokens of its own answer only
(and position ids that restart after the prompt for each answer), so the prompt runs once and not once per
class. An answer's last token is never fed (it is only predicted), and the vocabulary head runs only where
an answer token is predicted (hidden states are sliced first).

Training minimises the cross-entropy of the label over these class scores (the training loop's
`F.cross_entropy(logits, labels)`, unchanged): the same discriminative objective as the encoder classifiers,
so accuracy, merging, pruning and Shapley values read one kind of logits; an SFT loss on the answer
tokens would only raise the right answer without lowering the others, and needs a loop of its own.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from copra.models.text import MAX_CACHED_TEXTS, pad_batch
from copra.utils.compat import additive_mask
from copra.utils.errors import UserError
from copra.utils.precision import autocast_of

ANSWER_SCORES = ("sum", "mean")
_TEXT = "\x00copra-text\x00"  # stands for the example while the chat template is rendered once
_HEAD_ELEMENTS = 2**25  # at most this many vocabulary logits at once (128 MB in fp32): the head runs in row chunks


def split_prompts(prompts: list[str]) -> tuple[str, list[str], list[str]]:
    """(the prompts' shared start, each prompt's answer, each class's name) of filled class prompts.

    The shared start is cut back to its last space, so an answer starts at a word (" donate."); the names
    (for the list of choices) are the answers without their shared end (".", " news."), never cut mid-word.
    """
    shared = os.path.commonprefix(prompts) if len(prompts) > 1 else prompts[0]
    cut = max(shared.rfind(" "), 0)
    answers = [p[cut:] for p in prompts]
    end = os.path.commonprefix([a[::-1] for a in answers])[::-1] if len(answers) > 1 else ""
    end = end.lstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    names = [a[: len(a) - len(end)].strip() or a.strip() for a in answers]
    return shared[:cut], answers, names


def answer_layout(answers: list[list[int]]) -> dict[str, torch.Tensor]:
    """Where each class's answer sits in the packed block after the prompt (index tensors, CPU).

    Only an answer's tokens but its last are fed (its last is only ever a target; a one-token answer
    feeds nothing): `fed` [F] with their `owner` class and `offset` in the answer; `targets` [S] every
    answer token, `target_owner` its class, `source` the fed token that predicts it (-1: the prompt's last).
    """
    fed, owner, offset, targets, target_owner, source = [], [], [], [], [], []
    for c, ids in enumerate(answers):
        start = len(fed)
        for k, token in enumerate(ids):
            targets.append(token)
            target_owner.append(c)
            source.append(start + k - 1 if k else -1)
        fed += ids[:-1]
        owner += [c] * (len(ids) - 1)
        offset += list(range(len(ids) - 1))
    names = ("fed", "owner", "offset", "targets", "target_owner", "source")
    return {
        n: torch.tensor(v, dtype=torch.long)
        for n, v in zip(names, (fed, owner, offset, targets, target_owner, source))
    }


class CausalClassifier(nn.Module):
    """Classes scored by the log-likelihood of their answers under a (LoRA-adapted) causal LM.

    `encoder` is a PeftModel around a transformers `*ForCausalLM`; `tokenizer` is its tokenizer (with a
    chat template or without). `max_length` cuts each example's text; `context` is the model's positions.
    Offers what the scoring path (`copra.models.evaluation`) calls: `set_prompts`, `inputs_for`,
    `input_length`, `class_embeddings`, `scores`, `logits`, `embed_batch`, `scores_of`, `logits_of`.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer,
        max_length: int = 64,
        answer_score: str = "sum",
        list_choices: bool = False,
        context: int | None = None,
    ):
        super().__init__()
        if answer_score not in ANSWER_SCORES:
            raise UserError(f"answer_score must be one of {list(ANSWER_SCORES)}, got {answer_score!r}")
        self.encoder, self.tokenizer = encoder, tokenizer
        self.max_length, self.answer_score, self.list_choices, self.context = (
            max_length,
            answer_score,
            list_choices,
            context,
        )
        self.precision = "fp32"  # set by copra.models.build_classifier (copra.utils.precision)
        self.prompts: list[str] = []
        self._head = self._chat_parts()  # token ids before the example text, and the text after it
        self._tail: list[int] = []  # after the example: the choices, the end of the user turn, the answers' start
        self._answers: list[list[int]] = []
        self._layout: dict[str, torch.Tensor] = {}
        self._token_ids: dict[str, list[int]] = {}

    # -- prompts -------------------------------------------------------------------------------------
    def _chat_parts(self) -> tuple[list[int], str]:
        """(ids before the example text, the text after it up to the assistant's turn)."""
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:  # a plain LM: the text, the choices, then the answer on a new line
            return self._encode("", special=True), "\n"
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": _TEXT}], tokenize=False, add_generation_prompt=True
        )
        before, _, after = rendered.partition(_TEXT)
        return self._encode(before), after

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def set_prompts(self, prompts: list[str]) -> None:
        """The class prompts, one per class (e.g. task.prompts()): the prompt's end and every class's answer."""
        if not prompts:
            raise UserError("a classifier needs at least one class prompt")
        start, answers, names = split_prompts(list(prompts))
        choices = f"\n\nChoose one of: {', '.join(names)}." if self.list_choices else ""
        tail = self._encode(choices + self._head[1] + start)
        answer_ids = [self._encode(a) for a in answers]
        if any(not ids for ids in answer_ids):
            raise UserError(f"a class prompt tokenises to an empty answer: {prompts!r}")
        longest = len(self._head[0]) + self.max_length + len(tail) + max(len(a) for a in answer_ids)
        if self.context is not None and longest > self.context:
            raise UserError(
                f"a prompt of up to {longest} tokens (max_length={self.max_length} text tokens, the template, the "
                f"choices and the longest answer) exceeds the model's context of {self.context} positions; "
                "lower max_length or shorten the class prompts"
            )
        self.prompts, self._tail, self._answers = list(prompts), tail, answer_ids
        self._layout = answer_layout(answer_ids)

    def class_embeddings(self) -> torch.Tensor:
        """The answers' token ids [C, A] (-1 pads): what `scores` takes as `classes` (the name is the scoring path's)."""
        if not self._answers:
            raise UserError("call set_prompts(task.prompts()) before classifying")
        out = torch.full((len(self._answers), max(len(a) for a in self._answers)), -1, dtype=torch.long)
        for c, ids in enumerate(self._answers):
            out[c, : len(ids)] = torch.tensor(ids)
        return out

    # -- inputs ------------------------------------------------------------------------------------
    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each example text, cut at max_length; a text seen before is not tokenised again."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._token_ids))
        if missing:
            if len(self._token_ids) + len(missing) > MAX_CACHED_TEXTS:
                self._token_ids.clear()
            encoded = self.tokenizer(missing, add_special_tokens=False, truncation=True, max_length=self.max_length)
            self._token_ids.update(zip(missing, encoded["input_ids"]))
        return [self._token_ids[t] for t in texts]

    def inputs_for(self, texts: list[str], train: bool = False) -> dict[str, torch.Tensor]:
        """The prompts' starts (template head + text) [B, T], left-padded; the rest follows in `forward`."""
        return pad_batch([self._head[0] + ids for ids in self.token_ids(list(texts))], self.tokenizer)

    def input_length(self, text: str) -> int:
        """Tokens of one example's prompt start (evaluation sorts its batches by it)."""
        return len(self._head[0]) + len(self.token_ids([text])[0])

    # -- scores ------------------------------------------------------------------------------------
    @property
    def lm(self) -> nn.Module:
        """The `*ForCausalLM` inside the PEFT wrapper (its LoRA layers are in place)."""
        get_base = getattr(self.encoder, "get_base_model", None)
        return get_base() if callable(get_base) else self.encoder

    def answer_loglik(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sum of each class's answer-token log-probabilities [B, C] (fp32), all classes in one forward."""
        if not self._answers:
            raise UserError("call set_prompts(task.prompts()) before classifying")
        device = input_ids.device
        batch, width = input_ids.shape
        layout = {k: v.to(device) for k, v in self._layout.items()}
        tail = torch.tensor(self._tail, dtype=torch.long, device=device)
        context = width + len(tail)  # prompt columns (left padding, head, text, tail)
        ids = torch.cat([input_ids, tail.expand(batch, -1), layout["fed"].expand(batch, -1)], 1)  # [B, L]
        real = attention_mask.sum(1, keepdim=True)  # [B, 1] real prompt-start tokens
        positions = torch.cat(
            [
                (attention_mask.cumsum(1) - 1).clamp_min(0),
                real + torch.arange(len(tail), device=device),
                real + len(tail) + layout["offset"],
            ],
            1,
        )  # [B, L]: each answer restarts right after the prompt
        mask = self._packed_mask(attention_mask, context, layout["owner"])  # [B, 1, L, L]
        with autocast_of(self, device):
            hidden = self.lm.get_decoder()(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
            ).last_hidden_state  # [B, L, H]
        # an answer's first token is predicted at the prompt's last column, token k at its own token k-1
        source = layout["source"]
        before = torch.where(source < 0, context - 1, context + source)  # [S] columns
        picked = self._token_logprobs(hidden[:, before], layout["targets"])  # [B, S]
        return torch.zeros(batch, len(self._answers), device=device).index_add_(1, layout["target_owner"], picked)

    def _packed_mask(self, attention_mask: torch.Tensor, context: int, owner: torch.Tensor) -> torch.Tensor:
        """[B, 1, L, L] attention of prompt + packed answers: causal prompt, each answer sees the prompt and itself."""
        device, size = attention_mask.device, context + len(owner)
        allowed = torch.ones(size, size, dtype=torch.bool, device=device).tril()  # [L, L]
        answers = owner[:, None] == owner[None, :]  # [S, S]: the same answer
        allowed[context:, context:] &= answers
        keys = torch.cat(
            [
                attention_mask.bool(),
                attention_mask.new_ones(attention_mask.shape[0], size - attention_mask.shape[1]).bool(),
            ],
            1,
        )
        allowed = allowed[None] & keys[:, None, :]  # [B, L, L]: no padding key
        allowed |= torch.eye(
            size, dtype=torch.bool, device=device
        )  # a padding query sees itself: no empty softmax row
        if additive_mask(self.lm):  # eager adds the mask to the scores
            return torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, torch.finfo(torch.float32).min)[
                :, None
            ]
        return allowed[:, None]

    def _token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets[s]) [B, S] from the hidden states that predict them [B, S, H], the head in row chunks."""
        head = self.lm.get_output_embeddings()
        rows = max(1, _HEAD_ELEMENTS // (hidden.shape[1] * head.weight.shape[0]))
        out = []
        for chunk in hidden.split(rows):
            with autocast_of(self, hidden.device):
                logits = head(chunk)  # [b, S, V]
            logprobs = logits.float().log_softmax(-1)
            out.append(logprobs.gather(-1, targets.expand(chunk.shape[0], -1)[..., None])[..., 0])
        return torch.cat(out)

    def embed_batch(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The class log-likelihoods [B, C] of a collated batch (what the encoders' embeddings are to them)."""
        device = next(self.parameters()).device
        return self.answer_loglik(**{k: v.to(device) for k, v in inputs.items()})

    def scores_of(self, loglik: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Class scores [B, C]: the answers' summed log-probabilities, or their mean per token ("mean")."""
        if self.answer_score == "sum":
            return loglik
        classes = self.class_embeddings() if classes is None else classes
        return loglik / (classes >= 0).sum(1).to(loglik.device, loglik.dtype)

    def logits_of(self, loglik: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, C] for the cross-entropy: the class scores themselves (log-probabilities, no temperature)."""
        return self.scores_of(loglik, classes)

    def scores(self, inputs: dict[str, torch.Tensor], classes: torch.Tensor | None = None) -> torch.Tensor:
        """Class scores [B, C] of a collated batch; the argmax is the predicted class."""
        return self.scores_of(self.embed_batch(inputs), classes)

    def logits(self, inputs: dict[str, torch.Tensor], classes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, C] of a collated batch (for a loss)."""
        return self.logits_of(self.embed_batch(inputs), classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] (training's cross-entropy reads them)."""
        return self.logits_of(self.answer_loglik(input_ids, attention_mask))


def build_causal_classifier(config) -> CausalClassifier:
    """`config.model` (embedded:smollm2, a local folder or a hub name of a causal LM) with LoRA, as a CausalClassifier."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from copra.models.base_model import resolve_model_path
    from copra.models.loading import quiet_loading
    from copra.models.lora import attach_lora
    from copra.utils.compat import supported_attention
    from copra.utils.precision import attention_implementation, resolve

    path = resolve_model_path(config.model)
    try:
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(path)
            lm = AutoModelForCausalLM.from_pretrained(
                path,
                use_safetensors=True,  # never a pickle
                dtype=torch.float32,
                attn_implementation=supported_attention(path, attention_implementation(resolve(config.precision))),
            )
    except (OSError, ValueError) as error:
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"cannot load the causal LM {config.model!r}: {detail}") from None
    tokenizer.padding_side = "left"  # every prompt then ends in the same column, where the answers start
    encoder = attach_lora(lm.eval(), config)
    positions = getattr(lm.config, "max_position_embeddings", None)
    return CausalClassifier(
        encoder,
        tokenizer,
        max_length=config.max_length,
        answer_score=config.answer_score,
        list_choices=config.list_choices,
        context=positions if isinstance(positions, int) else None,
    )


__all__ = ["ANSWER_SCORES", "CausalClassifier", "answer_layout", "build_causal_classifier", "split_prompts"]
