"""The TransformerLens adapter: a ``HookedTransformer`` behind the :class:`~.base.ModelAdapter` interface."""

from __future__ import annotations

import torch

from ..data import Batch
from .base import LinearMap, ModelAdapter, block_of_hook

__all__ = ["HookedTransformerAdapter"]


class HookedTransformerAdapter(ModelAdapter):
    """Adapter for a TransformerLens ``HookedTransformer``.

    Linear maps per block (TransformerLens 3.x names): ``attn.W_Q/W_K/W_V`` (input: the ``ln1`` module's
    output, which includes the LayerNorm affine; output ``attn.hook_q/k/v``), ``attn.W_O`` (input
    ``attn.hook_z``, output ``hook_attn_out``), ``mlp.W_in`` (input: ``ln2`` output, output
    ``mlp.hook_pre``), ``mlp.W_out`` (input ``mlp.hook_post``, output ``hook_mlp_out``).
    Right-padded batches are run without an attention mask: in a causal model padding at the end does not
    change any real token.
    """

    def __init__(self, model, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        self.n_blocks = model.cfg.n_layers
        self.d_model = model.cfg.d_model
        self.context_length = model.cfg.n_ctx
        if model.cfg.use_split_qkv_input or model.cfg.use_attn_in:
            raise ValueError("use_split_qkv_input / use_attn_in are not supported: W_Q/W_K/W_V inputs differ per head")
        self.check_dtype()

    def logits(self, batch: Batch) -> torch.Tensor:
        return self.model(batch.to(self.device).input_ids, return_type="logits")

    def hook_names(self) -> list[str]:
        return list(self.model.hook_dict)

    def _run_to_hook(self, batch: Batch, hook_name: str, stop_early: bool) -> torch.Tensor:
        store = {}

        def keep(act, hook):
            store["act"] = act

        block = block_of_hook(hook_name)
        stop = block + 1 if (stop_early and block is not None) else None
        self.model.run_with_hooks(batch.input_ids, fwd_hooks=[(hook_name, keep)], stop_at_layer=stop, return_type=None)
        return store["act"]

    def _edit_hook(self, hook_name, edit):
        return self.model.hooks(fwd_hooks=[(hook_name, lambda act, hook: edit(act))])

    def extend(self, tokens: torch.Tensor, cache=None) -> tuple[torch.Tensor, object]:
        try:  # TransformerLens 3.x
            from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache as KVCache
        except ImportError:  # TransformerLens 2.x
            from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCache as KVCache

        if cache is None:
            cache = KVCache.init_cache(self.model.cfg, self.device, tokens.shape[0])
        return self.model(tokens.to(self.device), past_kv_cache=cache, return_type="logits")[:, -1], cache

    def _linear_maps(self, max_block: int | None = None) -> list[LinearMap]:
        last = self.n_blocks - 1 if max_block is None else min(max_block, self.n_blocks - 1)
        maps = []
        for l in range(last + 1):
            blk = self.model.blocks[l]
            attn = blk.attn
            for w, out in (("W_Q", attn.hook_q), ("W_K", attn.hook_k), ("W_V", attn.hook_v)):
                maps.append(LinearMap(f"blocks.{l}.attn.{w}", l, getattr(attn, w), "heads_in_dh", blk.ln1, out))
            maps.append(LinearMap(f"blocks.{l}.attn.W_O", l, attn.W_O, "heads_dh_out", attn.hook_z, blk.hook_attn_out))
            if getattr(blk, "mlp", None) is not None and hasattr(blk.mlp, "W_in"):
                mlp = blk.mlp
                maps.append(LinearMap(f"blocks.{l}.mlp.W_in", l, mlp.W_in, "in_out", blk.ln2, mlp.hook_pre))
                maps.append(LinearMap(f"blocks.{l}.mlp.W_out", l, mlp.W_out, "in_out", mlp.hook_post, blk.hook_mlp_out))
        return maps
