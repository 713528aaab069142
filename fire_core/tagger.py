"""A tagging vision tower for the tiny models: a SigLIP tower whose output, per patch, is the
one-hot code of what its own heads read there (colour, kind, character) and of where the patch
lies (the region words the world's answers use).

Why: LLaVA's projector maps a strong pretrained tower's features into the language model. Ours
is trained from scratch on a CPU, and measured (README, base VLM) the projector and decoder did
not learn to read the tower's continuous features within the stage's budget, while the same
tower's predictions made one-hot were read (colour questions 44-48% -> 84% of val). The tagger
is that finding as a module: the tower and its heads are trained by ``fire_core.vision`` and
then frozen; the LlavaNext projector and decoder see hard labels. On stage 01's nine-family
mix it made no difference (README): the mix gives each family too few chats for the lookup.

It is a transformers model (``model_type="fire_tagger"``), registered with the Auto classes
on first use (``models.build_model`` and ``models.load`` call :func:`register`), so a saved
model rebuilds it from its config. Only the tiny models use it; the paper's LLaVA-NeXT keeps its own tower.
"""

from __future__ import annotations

from functools import cache

import torch

MODEL_TYPE = "fire_tagger"


def config(**kwargs):
    """A ``TaggerVisionConfig`` (SigLIP's vision config plus ``tag_sizes``, ``patch_regions``
    and ``n_regions``)."""
    return _classes()[0](**kwargs)


def is_tagger(tower) -> bool:
    return getattr(getattr(tower, "config", None), "model_type", None) == MODEL_TYPE


def register() -> None:
    """Make the Auto classes know the tagger, so a saved model that has one loads. Idempotent."""
    _classes()


@cache
def _classes():
    """The classes are built on first use: importing transformers' SigLIP costs seconds, and
    most importers of fire_core.models never need it."""
    from transformers import AutoConfig, AutoModel, SiglipVisionConfig, SiglipVisionModel
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    class TaggerVisionConfig(SiglipVisionConfig):
        """SigLIP's vision config plus the tagger's label sets.

        ``tag_sizes``: classes per head (colour, kind, character), each read by a linear head on the
        tower's last hidden state. ``patch_regions``: for each patch (row-major), its region's index
        among ``n_regions`` (a fixed code, not learned). The output width is the tower's hidden size,
        so the sizes must fit in it; unused dimensions are zero."""

        model_type = MODEL_TYPE

        def __init__(self, tag_sizes: list[int] | None = None, patch_regions: list[int] | None = None,
                     n_regions: int = 0, **kwargs) -> None:
            super().__init__(**kwargs)
            self.tag_sizes = list(tag_sizes or [])
            self.patch_regions = list(patch_regions or [])
            self.n_regions = n_regions
            width = sum(self.tag_sizes) + self.n_regions
            if width > self.hidden_size:
                raise ValueError(f"the tagger's code ({width} = tags {self.tag_sizes} + {self.n_regions} regions) "
                                 f"does not fit in the tower's hidden size {self.hidden_size}")
            patches = (self.image_size // self.patch_size) ** 2
            if self.n_regions and len(self.patch_regions) != patches:
                raise ValueError(f"patch_regions has {len(self.patch_regions)} entries for {patches} patches")
            if any(not 0 <= r < self.n_regions for r in self.patch_regions):
                raise ValueError(f"patch_regions must lie in [0, {self.n_regions})")

    class TaggerVisionModel(SiglipVisionModel):
        """SigLIP's vision model with label heads. ``forward`` returns SigLIP's outputs with the
        last hidden state replaced by the one-hot code, so LlavaNext's feature selection
        (``hidden_states[-1]``) reads labels. ``features`` gives the tower's own last hidden state
        (what the heads read), for training the heads."""

        config_class = TaggerVisionConfig

        def __init__(self, config: TaggerVisionConfig) -> None:
            super().__init__(config)
            self.heads = torch.nn.ModuleList([torch.nn.Linear(config.hidden_size, n) for n in config.tag_sizes])
            self.post_init()

        def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return super().forward(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]

        def tags(self, hidden: torch.Tensor) -> list[torch.Tensor]:
            """Each head's predicted class index per patch."""
            return [head(hidden).argmax(-1) for head in self.heads]

        def code(self, hidden: torch.Tensor) -> torch.Tensor:
            n, p, _ = hidden.shape
            parts = [torch.nn.functional.one_hot(t, head.out_features).to(hidden.dtype)
                     for t, head in zip(self.tags(hidden), self.heads, strict=True)]
            if self.config.n_regions:  # from the config, never a buffer: from_pretrained leaves those unset
                where = torch.tensor(self.config.patch_regions, device=hidden.device)
                parts.append(torch.nn.functional.one_hot(where, self.config.n_regions).to(hidden.dtype).expand(n, p, -1))
            width = sum(x.shape[-1] for x in parts)
            parts.append(hidden.new_zeros(n, p, self.config.hidden_size - width))
            return torch.cat(parts, dim=-1)

        def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
            kwargs.pop("output_hidden_states", None)
            kwargs.pop("return_dict", None)
            out = super().forward(pixel_values=pixel_values, output_hidden_states=True, **kwargs)
            code = self.code(out.hidden_states[-1])
            return BaseModelOutputWithPooling(last_hidden_state=code, pooler_output=None,
                                              hidden_states=(*out.hidden_states[:-1], code),
                                              attentions=out.attentions)

    AutoConfig.register(MODEL_TYPE, TaggerVisionConfig, exist_ok=True)
    AutoModel.register(TaggerVisionConfig, TaggerVisionModel, exist_ok=True)
    return TaggerVisionConfig, TaggerVisionModel
