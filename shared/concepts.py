"""ED-LoRA concept tokens and layer-wise prompt encoding.

A concept `alice` is written `<alice>` in prompts and stands for two new tokens (`alice_a`, `alice_b`). Each new
token has one embedding per UNet cross-attention layer (16 for SD1.5), so a prompt is encoded once per layer with
that layer's embeddings, giving conditioning of shape [batch, layers, 77, dim]; cross-attention layer k reads
slice k. The base's embedding table is never touched: new tokens get ids past the vocabulary, and a small wrapper
around the token embedding looks those ids up in the concepts' own tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

HANDLE = re.compile(r"<([A-Za-z0-9][A-Za-z0-9_\-]*)>")
N_TOKENS = 2


@dataclass
class Concept:
    name: str
    class_word: str
    embeddings: torch.Tensor  # [layers, N_TOKENS, dim]

    @property
    def handle(self) -> str:
        return f"<{self.name}>"

    @property
    def tokens(self) -> list[str]:
        return [f"{self.name}_a", f"{self.name}_b"]


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

    # --- concepts -----------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.embedding.tables.keys())

    def add(self, concept: Concept, trainable: bool = False) -> nn.Parameter:
        if concept.name in self.embedding.tables:
            raise ValueError(f"concept {concept.name!r} is already loaded")
        expected = (self.n_layers, N_TOKENS, self.embedding.base.embedding_dim)
        if tuple(concept.embeddings.shape) != expected:
            raise ValueError(f"concept {concept.name!r}: embeddings {tuple(concept.embeddings.shape)}, base needs {expected}")
        w = self.embedding.base.weight
        p = nn.Parameter(concept.embeddings.detach().to(w.device, torch.float32).clone(), requires_grad=trainable)
        self.embedding.tables[concept.name] = p
        self.classes[concept.name] = concept.class_word
        return p

    def concepts(self) -> list[Concept]:
        return [Concept(n, self.classes[n], t.detach().float().cpu().clone()) for n, t in self.embedding.tables.items()]

    def init_embeddings(self, class_word: str, generator: torch.Generator, std: float = 0.013) -> torch.Tensor:
        """Token a: random (σ=std); token b: the class word's embedding; the same start in every layer."""
        ids = self.tokenizer(class_word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"class word {class_word!r} is {len(ids)} tokens; pick a word that is one token "
                             "(e.g. 'woman', 'dog', 'toy')")
        base = self.embedding.base.weight.detach().float().cpu()
        a = torch.randn(base.shape[1], generator=generator) * std
        return torch.stack([a, base[ids[0]]]).expand(self.n_layers, -1, -1).clone()

    # --- prompts -------------------------------------------------------------------------------------------

    def token_ids(self, prompt: str) -> torch.Tensor:
        """[77] ids; concept tokens as placeholders -1 - (concept*N_TOKENS + token), later made layer-wise."""
        known = self.names
        ids: list[int] = []
        pos = 0
        for m in HANDLE.finditer(prompt):
            ids += self.tokenizer(prompt[pos:m.start()], add_special_tokens=False).input_ids
            name = m.group(1)
            if name not in known:
                raise UnknownConceptError(f"unknown concept handle <{name}> in prompt {prompt!r}; known: "
                                          + (", ".join(f"<{k}>" for k in known) or "none (no adapter loaded)"))
            c = known.index(name)
            ids += [-1 - (c * N_TOKENS + t) for t in range(N_TOKENS)]
            pos = m.end()
        ids += self.tokenizer(prompt[pos:], add_special_tokens=False).input_ids
        n = self.tokenizer.model_max_length
        ids = [self.tokenizer.bos_token_id] + ids[: n - 2] + [self.tokenizer.eos_token_id]
        ids += [self.tokenizer.pad_token_id] * (n - len(ids))
        return torch.tensor(ids)

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
