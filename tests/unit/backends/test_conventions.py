"""backends.conventions: a role's transform is what most layers show; the prior breaks ties and is verified."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pytest_convdiff.backends import conventions
from pytest_convdiff.backends.tensors import StoredTensor
from pytest_convdiff.core.weight_errors import rope_permute


@dataclass
class _Pair:
    name: str
    gguf_name: str


def _q_layers(stored: list[bool], rng: np.random.Generator) -> tuple[list[_Pair], dict[str, tuple]]:
    """One head of q rows per layer, stored permuted (True) or as transformers stores it (False)."""
    pairs, samples = [], {}
    for i, permuted in enumerate(stored):
        hf = rng.standard_normal((8, 4)).astype(np.float32)
        p = _Pair(f"model.layers.{i}.self_attn.q_proj.weight", f"blk.{i}.attn_q.weight")
        pairs.append(p)
        samples[p.name] = (hf, rope_permute(hf, 1) if permuted else hf.copy(), 1)
    return pairs, samples


def test_most_layers_decide_and_the_one_that_breaks_the_convention_is_named():
    pairs, samples = _q_layers([True, True, False, True], np.random.default_rng(0))
    (role,) = conventions.establish(pairs, lambda p: samples[p.name], None).values()
    assert (role.role, role.transform, role.layers, role.agree) == ("attn_q.weight", "rope-permute", 4, 3)
    assert role.dissent == ["model.layers.2.self_attn.q_proj.weight"] and role.explained
    assert role.errors["rope-permute"] == 0.0 and role.errors["none"] > 1.0  # median over the layers
    assert not role.contradicts_prior  # there is no prior for this architecture


def test_a_tie_goes_to_the_prior_and_a_contradicted_prior_is_reported():
    pairs, samples = _q_layers([True, False], np.random.default_rng(1))
    permuting = conventions.Convention(permute_qk=True)
    (role,) = conventions.establish(pairs, lambda p: samples[p.name], permuting).values()
    assert (role.transform, role.agree) == ("rope-permute", 1)
    pairs, samples = _q_layers([False, False, False], np.random.default_rng(2))
    (role,) = conventions.establish(pairs, lambda p: samples[p.name], permuting).values()
    assert role.transform == "none" and role.prior == "rope-permute" and role.contradicts_prior


def test_norms_stored_as_one_plus_w_and_a_role_no_candidate_explains():
    rng = np.random.default_rng(3)
    w = [rng.standard_normal((16, 1)).astype(np.float32) * 0.1 for _ in range(3)]
    pairs = [_Pair(f"model.layers.{i}.input_layernorm.weight", f"blk.{i}.attn_norm.weight") for i in range(3)]
    (role,) = conventions.establish(pairs, lambda p: (w[int(p.name.split(".")[2])], w[int(p.name.split(".")[2])] + 1,
                                                      1), None).values()
    assert role.transform == "norm+1" and role.explained
    (role,) = conventions.establish(pairs, lambda p: (w[0], rng.standard_normal((16, 1)).astype(np.float32) * 5, 1),
                                    None).values()
    assert not role.explained  # unrelated values: neither candidate reproduces B


def test_an_expert_is_named_and_sliced_from_its_stacked_tensor():
    lookup = {"model.layers.1.mlp.experts.gate_proj": "blk.1.ffn_gate_exps"}.get
    assert conventions.expert_name("model.layers.1.mlp.experts.3.gate_proj", lookup) == ("blk.1.ffn_gate_exps", 3)
    assert conventions.expert_name("model.layers.1.mlp.gate_proj", lookup) is None
    stacked = StoredTensor("blk.1.ffn_gate_exps.weight", (4, 6, 32), "Q8_0", None, 1000, 4 * 6 * 34, 24, 32)  # type: ignore[arg-type]
    one = conventions.expert_slice(stacked, 2)
    assert one is not None and one.name == "blk.1.ffn_gate_exps.weight[2]"
    assert (one.shape, one.rows, one.offset, one.nbytes) == ((6, 32), 6, 1000 + 2 * 6 * 34, 6 * 34)
    assert conventions.expert_slice(stacked, 4) is None


def test_an_architecture_the_installed_gguf_py_does_not_know_still_pairs_by_name():
    """A converter newer than the installed gguf package writes an architecture name gguf-py lacks (cohere2moe
    under gguf 0.19): transformers names still map through the union of gguf-py's maps."""
    from pytest_convdiff.backends import pairing

    got = pairing.gguf_to_hf("an-architecture-nobody-knows", 2, [  # private: the name pairing itself
        "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight",
        "model.embed_tokens.weight", "model.layers.1.mlp.gate.weight", "model.layers.0.not_a_tensor.weight"])
    assert got == {"blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
                   "blk.1.ffn_down_exps.weight[3]": "model.layers.1.mlp.experts.3.down_proj.weight",
                   "token_embd.weight": "model.embed_tokens.weight",
                   "blk.1.ffn_gate_inp.weight": "model.layers.1.mlp.gate.weight"}


def test_a_name_map_leaves_gguf_py_s_shared_tables_as_they_were():
    """gguf-py updates its class-wide block table in place when it builds the map of an architecture with
    overrides: a later pair of another architecture in the same session would pair by the wrong names."""
    import gguf

    from pytest_convdiff.backends import pairing

    llama = gguf.MODEL_ARCH.LLAMA
    before = dict(pairing.tensor_name_map(llama, 2).mapping)  # private: the name map every pairing uses
    for arch in gguf.TensorNameMap.arch_block_mappings_cfg:
        pairing.tensor_name_map(arch, 2)
    assert dict(pairing.tensor_name_map(llama, 2).mapping) == before
