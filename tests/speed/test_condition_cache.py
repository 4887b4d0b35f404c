"""The independent-condition KV cache (a speed option of the non-default independent mode) against the
reference forward's masked joint attention."""

import pytest
import torch

from appleswap.speed.transformer import FastAppleTransformer
from tests.model.test_transformer import IDS, _inputs, _lora_model


@torch.no_grad()
def test_independent_condition_cache_equals_masked_joint_attention():
    model = _lora_model(num_layers=2, num_single_layers=2)  # the reference forward
    fast = FastAppleTransformer.from_reference(model)
    x, cond, text, t, g = _inputs()
    full = model(x, t, text=text, img_ids=IDS, condition=cond, guidance=g)
    masked = model(x, t, text=text, img_ids=IDS, condition=cond, guidance=g, independent_condition=True)
    cache = fast.build_condition_cache(cond, text, IDS)
    assert len(cache.keys_values) == 4 and cache.keys_values[0][0].shape[1] == 256  # one (K, V) per block
    cached = fast(x, t, text=text, img_ids=IDS, condition_cache=cache, guidance=g)
    torch.testing.assert_close(cached, masked, rtol=1e-5, atol=1e-5)
    assert (masked - full).abs().max() > 1e-4  # a different model state from APPLE's full joint attention
    # the cache does not depend on the noisy latent or timestep: reuse it at another step
    again = fast(x * 0.5, t * 0.5, text=text, img_ids=IDS, condition_cache=cache, guidance=g)
    torch.testing.assert_close(again, model(x * 0.5, t * 0.5, text=text, img_ids=IDS, condition=cond, guidance=g,
                                            independent_condition=True), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="either"):
        fast(x, t, text=text, img_ids=IDS, condition=cond, condition_cache=cache, guidance=g)

