"""FlatParams on tiny Hugging Face models built from configs: outputs and state_dict unchanged by
packing, ties kept, one add_ on .flat perturbs the model and its inverse restores it."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hosl import FlatParams, noise  # noqa: E402

VOCAB = 101


def gpt2(dtype=torch.float32):
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


def llama(tie: bool):
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


INPUT = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model, autocast_dtype=None):
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=bool(autocast_dtype)):
        return model(input_ids=INPUT).logits.float()


@pytest.mark.parametrize(
    "make", [gpt2, lambda: llama(True), lambda: llama(False)], ids=["gpt2", "llama-tied", "llama"]
)
def test_packing_keeps_outputs_state_and_ties(make):
    model = make()
    before_logits = logits(model)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    flat = FlatParams(list(model.parameters()) + [model.get_input_embeddings().weight])  # one listed twice

    assert flat.numel == sum(p.numel() for p in model.parameters())  # stored once
    assert torch.equal(logits(model), before_logits)
    state = model.state_dict()
    assert state.keys() == before_state.keys()
    for key in state:
        assert torch.equal(state[key], before_state[key]), key
    for p in model.parameters():
        assert p.untyped_storage().data_ptr() == flat.flat.untyped_storage().data_ptr()
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    noise.add_(flat.flat, [7], [1e-2])
    perturbed = logits(model)
    assert (perturbed - before_logits).abs().max() > 1e-3
    if tied:  # the tie survives: one write moved both ends
        assert torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    noise.add_(flat.flat, [7], [-1e-2])
    torch.testing.assert_close(logits(model), before_logits, rtol=1e-5, atol=1e-5)


def test_offsets_match_noise_positions():
    model = gpt2()
    flat = FlatParams(model.parameters())
    noise.add_(flat.flat, [3], [1.0])
    # Perturbing the whole buffer equals perturbing each parameter at its own offset.
    model2 = gpt2()
    for p, start, _end in FlatParams(model2.parameters()).segments():
        noise.add_(p.data, [3], [1.0], offset=start)
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), name


def test_trainable_with_autograd():
    model = gpt2()
    flat = FlatParams(model.parameters())
    model(input_ids=INPUT, labels=INPUT).loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in flat.params)


def test_low_precision_model_keeps_fp32_master():
    model = gpt2(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flat = FlatParams(model.parameters())
    assert flat.compute_dtype == torch.bfloat16 and set(flat.dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value.to(before[key].dtype), before[key]), key
    # An update far below a bfloat16 ulp survives in the master copy.
    start = flat.flat.clone()
    noise.add_(flat.flat, [1], [1e-6])
    assert not torch.equal(flat.flat, start)
    assert torch.isfinite(logits(model, torch.bfloat16)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_without_a_master_the_buffer_keeps_the_models_dtype(dtype):
    model = gpt2(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flat = FlatParams(model.parameters(), master=False)
    assert flat.flat.dtype == dtype and flat.flat.element_size() == 2
    assert all(p.dtype == dtype for p in model.parameters())
    for p in model.parameters():
        assert p.untyped_storage().data_ptr() == flat.flat.untyped_storage().data_ptr()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    noise.add_(flat.flat, [1], [1e-2])  # the parameters see a write into the buffer
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_without_a_master_mixed_dtypes_are_refused():
    with pytest.raises(ValueError, match="one dtype; got bfloat16, float32"):
        FlatParams(
            [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))], master=False
        )


def test_shared_storage_through_two_parameters_is_one_weight():
    a = torch.nn.Linear(4, 4)
    b = torch.nn.Linear(4, 4)
    b.weight = torch.nn.Parameter(a.weight.data)  # another Parameter object, same storage
    flat = FlatParams([a.weight, a.bias, b.weight, b.bias])
    assert flat.numel == 16 + 4 + 4
    noise.add_(flat.flat, [1], [1.0])
    assert torch.equal(a.weight, b.weight)


def test_packed_parameters_are_adopted_without_a_copy():
    buffer = torch.randn(4 * 4 + 4 + 3)
    a = torch.nn.Parameter(buffer[:16].view(4, 4))
    b = torch.nn.Parameter(buffer[16:20])
    c = torch.nn.Parameter(buffer[20:23])
    before = buffer.clone()
    flat = FlatParams([a, b, c])
    assert flat.flat.data_ptr() == buffer.data_ptr() and flat.numel == 23
    assert torch.equal(flat.flat, before)
    noise.add_(flat.flat, [5], [1.0])
    assert not torch.equal(buffer, before)  # the noise went into the very storage the parameters use
    expected = before.clone()
    noise.add_(expected, [5], [1.0])
    assert torch.equal(torch.cat([a.detach().reshape(-1), b.detach(), c.detach()]), expected)


def test_a_packed_run_inside_a_larger_buffer_is_adopted_and_the_rest_left_alone():
    """The trained parameters may be a run in the middle of a loaded client's buffer (its last
    blocks, the frozen ones before them): adopted as a view of that run; the rest never changes."""
    buffer = torch.randn(32)
    a, b = torch.nn.Parameter(buffer[5:21].view(4, 4)), torch.nn.Parameter(buffer[21:25])
    before = buffer.clone()
    flat = FlatParams([a, b])
    assert flat.flat.data_ptr() == buffer[5:].data_ptr() and flat.numel == 20
    noise.add_(flat.flat, [5], [1.0])
    expected = before[5:25].clone()
    noise.add_(expected, [5], [1.0])
    assert torch.equal(buffer[5:25], expected)
    assert torch.equal(buffer[:5], before[:5]) and torch.equal(buffer[25:], before[25:])


@pytest.mark.parametrize("order", ["reversed", "gap"])
def test_parameters_not_packed_in_order_are_copied(order):
    buffer = torch.randn(32)
    parts = {
        "reversed": [buffer[16:20], buffer[:16]],
        "gap": [buffer[:16], buffer[17:21]],
    }[order]
    params = [torch.nn.Parameter(t) for t in parts]
    values = [p.detach().clone() for p in params]
    flat = FlatParams(params)
    assert flat.flat.data_ptr() != buffer.data_ptr()
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    noise.add_(flat.flat, [5], [1.0])
    assert all(not torch.equal(p, v) for p, v in zip(params, values))


def test_errors():
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        FlatParams([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(TypeError, match="tensors"):
        FlatParams([[1.0, 2.0]])
    empty = FlatParams([])
    assert empty.numel == 0 and empty.flat.dtype == torch.float32
