"""Hugging Face causal-LM wrapper around the plain ``Transformer``, shipped as remote code by
``training/export.py`` next to a copy of ``model.py`` (imported relatively, so transformers' dynamic
module loader copies it along).

What the wrapper adds to the model, and why:

* Padding. The model attends causally with no padding mask. Right padding is harmless as it is (a
  real token never sees the padding after it), but left padding would let real tokens attend to
  the pads and shift their rotary positions. So each row's real tokens are rotated to the front,
  the batch runs in one forward, and the logits are rotated back: every real position gets exactly
  the logits of the unpadded sequence. This is what lm-evaluation-harness needs (right-padded
  loglikelihood batches without a mask, left-padded ``generate`` batches with one). A mask with
  holes (packed sequences) is refused. Logits at pad positions are meaningless.
* Generation without a KV cache: every step recomputes the whole sequence. The base
  ``prepare_inputs_for_generation`` would pass only the newest token once ``use_cache`` is on
  (lm-evaluation-harness always turns it on), so it is replaced.
* Loading. ``from_pretrained`` builds the model on the meta device and fills it from the
  checkpoint; ``_init_weights`` fills what no checkpoint holds (the rotary tables, non-persistent
  buffers) and initialises a model built from a bare config as ``Transformer`` would.

In eval mode (``from_pretrained`` returns the model in eval mode) MoE layers route with
``eval_capacity_factor`` (None: no token is ever dropped, so a row's logits do not depend on the
rest of the batch). With a finite factor, capacity is shared by every token of the batch, pads
included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_skymoe import SkyMoeConfig
from .model import MoEFeedForward, Router, Transformer, rotary_tables


class SkyMoeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SkyMoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    # Used only when config.tie_word_embeddings (mapped to tie_embeddings) is true.
    _tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SkyMoeConfig):
        super().__init__(config)
        self.model = Transformer(config.model_args())
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.lm_head = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        """``kwargs`` (position_ids, use_cache, return_dict, ...) are accepted and ignored: positions
        follow from the mask, and there is no cache."""
        logits = self._logits(input_ids, attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _logits(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None or bool(attention_mask.all()):
            return self.model(input_ids)
        mask = attention_mask.bool()
        positions = torch.arange(mask.shape[1], device=mask.device)
        starts = mask.long().argmax(1)  # the first real token of each row
        order = (positions + starts[:, None]) % mask.shape[1]  # rotates each row's real tokens to the front
        if not torch.equal(mask.gather(1, order), positions < mask.sum(1, keepdim=True)):
            raise ValueError("attention_mask must mark one contiguous run of tokens per row (left or right "
                             "padding); packed sequences are not supported")
        rotated = self.model(input_ids.gather(1, order))
        return torch.empty_like(rotated).scatter_(1, order[..., None].expand_as(rotated), rotated)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                                      **kwargs) -> dict[str, torch.Tensor | None]:
        """The whole sequence at every step (no KV cache)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear and Embedding (std = config.init_std), RMSNorm
        with torch.no_grad():
            if isinstance(module, Router):
                module.weight.normal_(std=self.config.init_std)
                module.bias.zero_()  # the gate bias starts at zero, as in Transformer
            elif isinstance(module, MoEFeedForward):
                module.aux_alpha.zero_()
            elif isinstance(module, Transformer):
                args = module.args
                cos, sin = rotary_tables(args.head_dim, args.max_seq_len, args.rope_theta, module.rope_cos.device,
                                         args.rope_freq_scaling)
                module.rope_cos.copy_(cos)
                module.rope_sin.copy_(sin)
