"""The transformers backend finds what it reads from a model's structure, not from a list of architectures:
the decoder layers (a module list with one entry per layer, whatever its name), the last layer's pre-norm
output (whatever the final norm is called), and a mixture of experts' router logits (the module transformers
declares for them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def _save(tmp_path: Path, config) -> Path:
    import transformers

    torch.manual_seed(0)
    cls = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32)
    out = tmp_path / config.model_type
    cls.save_pretrained(out)
    tok_src = Path(__file__).resolve().parents[3] / "fixtures" / "models" / "tiny-llama"
    if not (tok_src / "tokenizer.json").is_file():
        pytest.skip("the tiny fixtures are not built (python -m fixtures.tiny)")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok_src / f).is_file():
            (out / f).write_bytes((tok_src / f).read_bytes())
    return out


def test_layers_named_h_and_a_final_norm_named_ln_f(tmp_path):
    """Bloom keeps its layers in ``h`` (no ``layers``); the states after every layer are still read, and the
    last one before the final norm, as for every other model."""
    import transformers

    from pytest_convdiff.backends import hf

    cfg = transformers.BloomConfig(vocab_size=512, hidden_size=64, n_layer=3, n_head=4)
    backend = hf.load(_save(tmp_path, cfg), {"device": "cpu"})
    try:
        out = backend.forward([1, 5, 9, 13, 17])
        assert out.hidden.shape == (3, 5, 64)
        assert out.router is None  # a dense model has no router
        with torch.inference_mode():
            ref = backend.model(input_ids=torch.tensor([[1, 5, 9, 13, 17]]), output_hidden_states=True)
        # hidden_states[-1] is after the final norm: the backend's last entry is the norm's input
        assert np.allclose(out.hidden[1], ref.hidden_states[2][0].numpy(), atol=1e-5)
        assert not np.allclose(out.hidden[-1], ref.hidden_states[-1][0].numpy(), atol=1e-3)
    finally:
        backend.close()


def test_each_layer_s_own_output_where_the_recorded_states_start_after_layer_0(tmp_path):
    """Mamba records no embeddings entry: its hidden_states list is (layer 0, layer 1, ..., normed last). The
    backend reads each layer's own output (llama.cpp's ``l_out-N``), so layer 0 is layer 0, not layer 1."""
    import transformers

    from pytest_convdiff.backends import hf

    cfg = transformers.MambaConfig(vocab_size=512, hidden_size=32, state_size=4, num_hidden_layers=3)
    backend = hf.load(_save(tmp_path, cfg), {"device": "cpu"})
    try:
        ids = [1, 5, 9, 13, 17]
        out = backend.forward(ids)
        with torch.inference_mode():
            ref = backend.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            state = backend.model.backbone.embeddings(torch.tensor([ids]))
            by_hand = []
            for layer in backend.model.backbone.layers:
                state = layer(state)
                state = state[0] if isinstance(state, tuple) else state
                by_hand.append(state[0].numpy())
        for i in range(3):
            assert np.allclose(out.hidden[i], by_hand[i], atol=1e-5), i
        assert np.allclose(out.hidden[0], ref.hidden_states[0][0].numpy(), atol=1e-5)  # Mamba's own layout
        assert not np.allclose(out.hidden[0], by_hand[1], atol=1e-3)
    finally:
        backend.close()


def test_router_logits_of_every_layer_with_experts(tmp_path):
    import transformers

    from pytest_convdiff.backends import hf
    from pytest_convdiff.core import routing

    cfg = transformers.MixtralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    backend = hf.load(_save(tmp_path, cfg), {"device": "cpu"})
    try:
        assert backend.experts_used == 2
        out = backend.forward([1, 5, 9, 13, 17, 21])
        assert out.router.shape == (2, 6, 4) and np.isfinite(out.router).all()
        gate = backend.model.model.layers[1].mlp.gate.weight.detach().numpy()
        h = None

        def grab(_m, args, _out):
            nonlocal h
            h = args[0].detach().reshape(-1, 64).numpy()

        handle = backend.model.model.layers[1].mlp.gate.register_forward_hook(grab)
        backend.forward([1, 5, 9, 13, 17, 21])
        handle.remove()
        assert np.allclose(out.router[1], h @ gate.T, atol=1e-5)  # the router's own logits, layer by layer
        ids, _ = routing.summarise(out.router)
        assert ids.shape == (2, 6, 4)
        assert backend.forward([1, 5], hidden_states=False).router is None  # only with the hidden states
    finally:
        backend.close()
