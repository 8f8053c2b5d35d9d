"""Transformer: shapes, causality, seeded init, rotary embeddings."""

from __future__ import annotations

import pytest
import torch

from workers.model import ModelArgs, apply_rope, build_model, count_parameters, rope_tables

ARGS = ModelArgs(n_layers=2, dim=32, n_heads=4, vocab_size=64, seq_len=16)


def random_tokens(batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, ARGS.vocab_size, (batch, seq_len), generator=generator)


def test_output_shape():
    model = build_model(ARGS, seed=0)

    logits = model(random_tokens(3, ARGS.seq_len))

    assert logits.shape == (3, ARGS.seq_len, ARGS.vocab_size)
    assert logits.dtype == torch.float32


def test_shorter_sequence_shape():
    model = build_model(ARGS, seed=0)

    assert model(random_tokens(2, 5)).shape == (2, 5, ARGS.vocab_size)


def test_grouped_query_attention_shape():
    args = ModelArgs(n_layers=1, dim=32, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=16)
    model = build_model(args, seed=0)

    assert model.layers[0].attention.wk.weight.shape == (2 * args.head_dim, args.dim)
    assert model(random_tokens(2, 16)).shape == (2, 16, args.vocab_size)


@torch.no_grad()
def test_later_token_does_not_change_earlier_logits():
    model = build_model(ARGS, seed=0)
    tokens = random_tokens(1, ARGS.seq_len)
    changed = tokens.clone()
    changed[0, 10] = (tokens[0, 10] + 1) % ARGS.vocab_size

    before, after = model(tokens), model(changed)

    torch.testing.assert_close(after[:, :10], before[:, :10], rtol=0, atol=0)
    assert not torch.allclose(after[:, 10:], before[:, 10:])


def test_init_same_seed_same_weights():
    first = build_model(ARGS, seed=7).state_dict()
    second = build_model(ARGS, seed=7).state_dict()

    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_init_ignores_global_rng():
    torch.manual_seed(1)
    first = build_model(ARGS, seed=7).state_dict()
    torch.manual_seed(2)
    second = build_model(ARGS, seed=7).state_dict()

    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_init_other_seed_other_weights():
    first = build_model(ARGS, seed=7).state_dict()
    second = build_model(ARGS, seed=8).state_dict()

    assert not torch.equal(first["tok_embeddings.weight"], second["tok_embeddings.weight"])
    assert not torch.equal(first["layers.0.attention.wq.weight"], second["layers.0.attention.wq.weight"])


def test_init_scales_residual_projections():
    model = build_model(ARGS, seed=0)

    assert torch.equal(model.norm.weight, torch.ones(ARGS.dim))
    assert model.layers[0].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.layers[0].attention.wo.weight.std().item() == pytest.approx(0.02 / 2, rel=0.1)


def test_rope_buffers_not_in_state_dict():
    state = build_model(ARGS, seed=0).state_dict()

    assert not any("rope" in name for name in state)


def test_tied_embeddings_share_one_tensor():
    args = ModelArgs(n_layers=1, dim=32, n_heads=4, vocab_size=64, seq_len=16, tie_embeddings=True)
    untied = ModelArgs(n_layers=1, dim=32, n_heads=4, vocab_size=64, seq_len=16)
    model = build_model(args, seed=0)

    assert model.output.weight is model.tok_embeddings.weight
    assert count_parameters(build_model(untied, seed=0)) - count_parameters(model) == 64 * 32


def test_hidden_dim_llama_rule():
    assert ModelArgs(n_layers=1, dim=256, n_heads=8, vocab_size=8, seq_len=8).hidden_dim == 704
    assert ModelArgs(n_layers=1, dim=32, n_heads=4, vocab_size=8, seq_len=8, ffn_hidden=48).hidden_dim == 48


def test_rope_preserves_norms():
    head_dim, seq_len = 8, 32
    cos, sin = rope_tables(head_dim, seq_len, theta=10000.0)
    x = torch.randn(2, 3, seq_len, head_dim, generator=torch.Generator().manual_seed(0))

    rotated = apply_rope(x, cos, sin)

    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=1e-6)
    # Each channel pair is rotated on its own, so the norm of every pair is kept too.
    pair_norms = lambda t: t.unflatten(-1, (head_dim // 2, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norms(rotated), pair_norms(x), rtol=1e-6, atol=1e-6)


def test_rope_identity_at_position_zero():
    cos, sin = rope_tables(8, 4, theta=10000.0)
    x = torch.randn(1, 1, 4, 8, generator=torch.Generator().manual_seed(0))

    rotated = apply_rope(x, cos, sin)

    torch.testing.assert_close(rotated[..., 0, :], x[..., 0, :], rtol=0, atol=0)
    assert not torch.allclose(rotated[..., 1, :], x[..., 1, :])


def test_rope_scores_depend_on_offset_only():
    head_dim, seq_len = 8, 16
    cos, sin = rope_tables(head_dim, seq_len, theta=10000.0)
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(head_dim, generator=generator), torch.randn(head_dim, generator=generator)
    # The same q and k at every position: rotated scores then depend only on the position offset.
    q_rotated = apply_rope(q.expand(1, 1, seq_len, head_dim), cos, sin)[0, 0]
    k_rotated = apply_rope(k.expand(1, 1, seq_len, head_dim), cos, sin)[0, 0]

    score_2_0 = q_rotated[2] @ k_rotated[0]
    score_9_7 = q_rotated[9] @ k_rotated[7]
    score_9_6 = q_rotated[9] @ k_rotated[6]

    torch.testing.assert_close(score_9_7, score_2_0, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score_9_6, score_2_0, rtol=1e-3, atol=1e-3)
