"""ED-LoRA concept tokens and layer-wise prompt encoding.

A concept `alice` is written `<alice>` in prompts and stands for two new tokens (`alice_a`, `alice_b`). Each new
token has one embedding per UNet cross-attention layer (16 for SD1.5), so a prompt is encoded once per layer with
that layer's embeddings, giving conditioning of shape [batch, layers, 77, dim]; cross-attention layer k reads
slice k. The base's embedding table is never touched: new tokens get ids past the vocabulary, and a small wrapper
around the token embedding looks those ids up in the concepts' own tables.

A concept imported from a plain LoRA (`mos import-lora`) has no tokens of its own: its handle stands for its
trigger words, tokenised as ordinary text (embeddings of shape [layers, 0, dim]).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

HANDLE = re.compile(r"<([A-Za-z0-9][A-Za-z0-9_\-]*)>")
N_TOKENS = 2
# A concept name becomes a folder, a file name, a tensor key, a token and a log line, on both sides: always
# checked with fullmatch (`$` with re.match lets "alice\n" through).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")
MAX_CLASS_WORD = 64  # "woman", "teddy bear": a few words; a 1 MB class word is refused


def check_name(name: object, where: str = "concept") -> str:
    """A plain concept name (letters, digits, _ and -, at most 64, starting with a letter or digit), or ValueError."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"{where}: name {str(name)[:80]!r} is not a plain name (letters, digits, _ and -, at most "
                         "64 characters, starting with a letter or digit)")
    return name


def check_class_word(word: object, where: str = "concept") -> str:
    """A class word is a few plain printable words (or empty for a trigger-word concept), at most 64 characters."""
    if not isinstance(word, str) or len(word) > MAX_CLASS_WORD or (word and (
            not word.isprintable() or HANDLE.search(word) or word != " ".join(word.split()))):
        raise ValueError(f"{where}: class word {str(word)[:80]!r} must be plain printable words without <handles>, "
                         f"at most {MAX_CLASS_WORD} characters")
    return word


@dataclass
class Concept:
    name: str
    class_word: str
    embeddings: torch.Tensor  # [layers, N_TOKENS, dim]; [layers, 0, dim] for a trigger-word concept
    trigger: str = ""         # set only for a concept imported from a plain LoRA

    @property
    def handle(self) -> str:
        return f"<{self.name}>"

    @property
    def tokens(self) -> list[str]:
        return [] if self.trigger else [f"{self.name}_a", f"{self.name}_b"]

    @property
    def n_tokens(self) -> int:
        return 0 if self.trigger else N_TOKENS

    @property
    def base_words(self) -> str:
        """What a model without this concept gets in place of its handle (evaluation baselines)."""
        return self.class_word or self.trigger


def check_trigger(trigger: str) -> str:
    """A trigger is plain words: no concept handles, no control characters, not empty."""
    t = " ".join(trigger.split())
    if not t or HANDLE.search(t) or not t.isprintable() or len(t) > 200:
        raise ValueError(f"trigger {trigger!r} must be plain printable words (no <handle>), at most 200 characters")
    return t


class UnknownConceptError(ValueError):
    pass


class ConceptEmbedding(nn.Module):
    """Token embedding that also knows the concepts' layer-wise rows (ids >= vocab size)."""

    def __init__(self, base: nn.Embedding, n_layers: int):
        super().__init__()
        self.base = base
        self.n_layers = n_layers
        self.vocab = base.num_embeddings
        self.tables = nn.ParameterDict()  # name -> [layers, N_TOKENS, dim]

    @property
    def weight(self) -> torch.Tensor:  # transformers reads this for dtype/device
        return self.base.weight

    def row(self, concept: int, layer: int, token: int) -> int:
        return self.vocab + (concept * self.n_layers + layer) * N_TOKENS + token

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.vocab
        out = self.base(torch.where(new, 0, ids))
        if not bool(new.any()):
            return out
        extra = torch.cat([t.reshape(-1, t.shape[-1]) for t in self.tables.values()]).to(out.dtype)
        return torch.where(new[..., None], extra[(ids - self.vocab).clamp(min=0)], out)


# Token a starts at half its init word's embedding. At the whole word, two stars of the world base started at "red"
# and "green" kept their colours through fusion, but their own adapters drew them less often (carol 0.75 and 0.83 of
# 48 pictures, against 0.98 and 1.00 started random); at half, the own rates came back (0.90-1.00) and fusion still
# kept them (docs/world.md, "Trials of the twenty-second session").
INIT_WORD_SCALE = 0.5


class PromptEncoder:
    """Tokenises prompts with concept handles and encodes them layer-wise."""

    def __init__(self, tokenizer, text_encoder: nn.Module, n_layers: int):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.n_layers = n_layers
        emb = text_encoder.embeddings.token_embedding
        if not isinstance(emb, ConceptEmbedding):
            emb = ConceptEmbedding(emb, n_layers)
            text_encoder.embeddings.token_embedding = emb
        self.embedding = emb
        self.classes: dict[str, str] = {}
        self.triggers: dict[str, str] = {}  # trigger-word concepts: name -> words
        self.order: list[str] = []          # every concept, in the order added

    # --- concepts -----------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.order)

    def table_index(self, name: str) -> int:
        """Position of a token concept among the embedding tables (what its row ids are made of)."""
        return list(self.embedding.tables.keys()).index(name)

    def add(self, concept: Concept, trainable: bool = False) -> nn.Parameter:
        if concept.name in self.order:
            raise ValueError(f"concept {concept.name!r} is already loaded")
        expected = (self.n_layers, concept.n_tokens, self.embedding.base.embedding_dim)
        if tuple(concept.embeddings.shape) != expected:
            raise ValueError(f"concept {concept.name!r}: embeddings {tuple(concept.embeddings.shape)}, base needs {expected}")
        w = self.embedding.base.weight
        p = nn.Parameter(concept.embeddings.detach().to(w.device, torch.float32).clone(), requires_grad=trainable)
        if concept.trigger:
            self.triggers[concept.name] = check_trigger(concept.trigger)
        else:
            self.embedding.tables[concept.name] = p
        self.classes[concept.name] = concept.class_word
        self.order.append(concept.name)
        return p

    def concepts(self) -> list[Concept]:
        dim = self.embedding.base.embedding_dim
        out = []
        for n in self.order:
            if n in self.triggers:
                out.append(Concept(n, self.classes[n], torch.zeros(self.n_layers, 0, dim), self.triggers[n]))
            else:
                out.append(Concept(n, self.classes[n], self.embedding.tables[n].detach().float().cpu().clone()))
        return out

    def init_embeddings(self, class_word: str, generator: torch.Generator, std: float = 0.013,
                        init_word: str | None = None) -> torch.Tensor:
        """Token a: random (σ=std), or `init_word`'s embedding times INIT_WORD_SCALE; token b: the class word's;
        the same start in every layer. An init word says what sets the concept apart from its class (its colour,
        say), so that the tokens, not only the LoRA, carry it from the first step (docs/design.md, "ED-LoRA")."""
        base = self.embedding.base.weight.detach().float().cpu()
        a = torch.randn(base.shape[1], generator=generator) * std  # drawn either way: the LoRA's draws follow it
        if init_word:
            a = base[self.word_id(init_word, "init word")] * INIT_WORD_SCALE
        return torch.stack([a, base[self.word_id(class_word, "class word")]]).expand(self.n_layers, -1, -1).clone()

    def word_id(self, word: str, what: str) -> int:
        """The one token id of `word`; a word the tokenizer splits is refused."""
        ids = self.tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"{what} {word!r} is {len(ids)} tokens; pick a word that is one token "
                             "(e.g. 'woman', 'dog', 'toy', 'red')")
        return ids[0]

    # --- prompts -------------------------------------------------------------------------------------------

    def token_ids(self, prompt: str) -> torch.Tensor:
        """[77] ids; concept tokens as placeholders -1 - (concept*N_TOKENS + token), later made layer-wise."""
        return self._tokenize(prompt)[0]

    def concept_mask(self, prompts: list[str]) -> torch.Tensor:
        """[batch, 77] True where a concept's tokens (its own, or its trigger words) sit."""
        return torch.stack([self._tokenize(p)[1] for p in prompts])

    def _tokenize(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        known = self.names
        ids: list[int] = []
        mask: list[bool] = []
        pos = 0
        for m in HANDLE.finditer(prompt):
            text = self.tokenizer(prompt[pos:m.start()], add_special_tokens=False).input_ids
            ids, mask = ids + text, mask + [False] * len(text)
            name = m.group(1)
            if name not in known:
                raise UnknownConceptError(f"unknown concept handle <{name}> in prompt {prompt!r}; known: "
                                          + (", ".join(f"<{k}>" for k in known) or "none (no adapter loaded)"))
            if name in self.triggers:
                mine = self.tokenizer(self.triggers[name], add_special_tokens=False).input_ids
            else:
                c = self.table_index(name)
                mine = [-1 - (c * N_TOKENS + t) for t in range(N_TOKENS)]
            ids, mask = ids + mine, mask + [True] * len(mine)
            pos = m.end()
        text = self.tokenizer(prompt[pos:], add_special_tokens=False).input_ids
        ids, mask = ids + text, mask + [False] * len(text)
        n = self.tokenizer.model_max_length
        ids = [self.tokenizer.bos_token_id] + ids[: n - 2] + [self.tokenizer.eos_token_id]
        mask = [False] + mask[: n - 2] + [False]
        ids += [self.tokenizer.pad_token_id] * (n - len(ids))
        mask += [False] * (n - len(mask))
        return torch.tensor(ids), torch.tensor(mask)

    def layerwise_ids(self, prompts: list[str]) -> torch.Tensor:
        """[batch, layers, 77] ids with each concept token mapped to its row for that layer."""
        ids = torch.stack([self.token_ids(p) for p in prompts])
        out = ids[:, None, :].repeat(1, self.n_layers, 1)
        placeholder = ids < 0
        if placeholder.any():
            code = (-1 - ids).clamp(min=0)
            concept, token = code // N_TOKENS, code % N_TOKENS
            for k in range(self.n_layers):
                rows = self.embedding.vocab + (concept * self.n_layers + k) * N_TOKENS + token
                out[:, k] = torch.where(placeholder, rows, ids)
        return out

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Conditioning [batch, layers, 77, dim]. Prompts without concepts are encoded once and repeated."""
        ids = self.layerwise_ids(prompts).to(self.embedding.base.weight.device)
        b, L, n = ids.shape
        has = (ids >= self.embedding.vocab).any(dim=(1, 2))
        out = None
        if bool(has.all()):
            out = self.text_encoder(ids.reshape(b * L, n)).last_hidden_state.reshape(b, L, n, -1)
        else:
            plain = self.text_encoder(ids[:, 0]).last_hidden_state[:, None].expand(b, L, n, -1)
            if bool(has.any()):
                sel = has.nonzero().flatten()
                cond = self.text_encoder(ids[sel].reshape(-1, n)).last_hidden_state.reshape(len(sel), L, n, -1)
                plain = plain.clone()
                plain[sel] = cond
            out = plain
        return out
