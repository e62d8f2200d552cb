"""hosl.split: client + server against the unsplit model (logits, loss, gradients) for every family and
cut, the model left as it was, per-side parameters, errors, and loading one side from a checkpoint."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from _tiny_models import FAMILIES, LAYERS, batch, config, model

import hosl
from hosl import split
from hosl.loading import load_client, load_server
from hosl.scoring import candidate_scores, target_scores
from hosl.split import Activation, SplitError, labelled_positions, split_model, split_summary, train_last_blocks


def _split_forward(m, k, ids, mask, labels):
    client, server = split_model(m, k)
    h = client(input_ids=ids, attention_mask=mask)
    return server(h.detach(), labels=labels)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_split_equals_unsplit(family, padding):
    m = model(family)
    ids, mask, labels = batch(padding=padding)
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask, labels=labels)
        for k in range(LAYERS + 1):
            out = _split_forward(m, k, ids, mask, labels)
            torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5, msg=f"k={k}")
            torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-5, msg=f"k={k}")
            bare = _split_forward(m, k, ids, None, None)  # no mask, no labels
            assert bare.loss is None
            torch.testing.assert_close(bare.logits, m(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_head_at_labelled_positions_only(family):
    """labelled_only: the full head's logits at the positions that predict a label, the same loss,
    and the same rank-classification scores."""
    m = model(family)
    ids, mask, labels = batch(padding="left")
    labels[:, :-3] = -100  # an answer: the last three tokens of each row
    with torch.no_grad():
        client, server = split_model(m, 1)
        h = client(input_ids=ids, attention_mask=mask)
        full = server(h, labels=labels)
        kept = server(h, labels=labels, labelled_only=True)
    keep = labelled_positions(labels)
    assert keep.tolist() == [5, 6, 7]  # 9 tokens: positions 5, 6, 7 predict tokens 6, 7, 8
    assert kept.logits.shape == (3, 3, full.logits.shape[-1])
    torch.testing.assert_close(kept.logits, full.logits[:, keep], rtol=0, atol=1e-5)
    torch.testing.assert_close(kept.loss, full.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        target_scores(kept.logits, labels[:, keep + 1]), candidate_scores(full.logits, labels), rtol=0, atol=1e-5
    )
    with pytest.raises(ValueError, match="labelled_only needs labels"):
        server(h, labelled_only=True)


def test_per_layer_masks_follow_the_cut():
    """Gemma2 alternates sliding-window and full attention and picks a block's mask by its index in
    the loop: without the cut config the server's first block would get block 0's mask type."""
    m = model("gemma2")
    ids, mask, _ = batch(seq=9)
    ref = m(input_ids=ids, attention_mask=mask).logits
    client, server = split_model(m, 1)
    assert server.lm.config.layer_types == m.config.layer_types[1:]
    torch.testing.assert_close(server(client(input_ids=ids, attention_mask=mask)).logits, ref, rtol=0, atol=1e-5)
    # The window matters at this length: full attention everywhere gives other logits.
    full = model("gemma2", layer_types=["full_attention"] * LAYERS)
    assert not torch.allclose(full(input_ids=ids, attention_mask=mask).logits, ref, atol=1e-3)


@pytest.mark.parametrize("overrides", [{"word_embed_proj_dim": 16}, {"do_layer_norm_before": False}], ids=str)
def test_opt_projections_and_post_norm(overrides):
    """OPT-350m's layout: project_in/project_out around the blocks, or no final layer norm."""
    m = model("opt", **overrides)
    ids, mask, labels = batch()
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask, labels=labels)
        for k in range(LAYERS + 1):
            out = _split_forward(m, k, ids, mask, labels)
            torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_gradients_cross_the_cut(family):
    """Backprop through server then client (the FO split-learning exchange) equals unsplit backprop."""
    m = model(family)
    ids, mask, labels = batch()
    m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()

    client, server = split_model(m, 2)
    h = client(input_ids=ids, attention_mask=mask)
    received = h.detach(requires_grad=True)
    server(received, labels=labels).loss.backward()
    h.hidden.backward(received.hidden.grad)

    emb = m.get_input_embeddings().weight
    tied = m.get_output_embeddings().weight is emb
    head = server.lm.get_output_embeddings().weight
    for n, p in m.named_parameters():
        if p is emb and tied:
            # Tied in the unsplit model: its gradient is the sum of the embedding's and the head's.
            torch.testing.assert_close(p.grad + head.grad, ref[n], rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_model_is_left_as_it_was():
    m = model("llama", tie_word_embeddings=True)
    ids, mask, _ = batch()
    before_modules = [(n, id(mod)) for n, mod in m.named_modules()]
    before_params = [(n, id(p)) for n, p in m.named_parameters(remove_duplicate=False)]
    ref = m(input_ids=ids, attention_mask=mask).logits.detach()
    client, server = split_model(m, 2)
    server(client(input_ids=ids, attention_mask=mask))
    assert [(n, id(mod)) for n, mod in m.named_modules()] == before_modules
    assert [(n, id(p)) for n, p in m.named_parameters(remove_duplicate=False)] == before_params
    assert m.lm_head.weight is m.model.embed_tokens.weight  # the owner's tie stays
    assert m.config.num_hidden_layers == LAYERS
    assert all(not mod._forward_pre_hooks and not mod._forward_hooks for mod in m.modules())
    torch.testing.assert_close(m(input_ids=ids, attention_mask=mask).logits, ref, rtol=0, atol=0)
    # The sides share the blocks' tensors with it: no weight was copied but the untied head.
    assert client.stack.embed_tokens.weight is m.model.embed_tokens.weight
    assert server.lm.model.layers[0].mlp.up_proj.weight is m.model.layers[2].mlp.up_proj.weight


def test_tied_head_is_untied_at_the_cut():
    m = model("gpt2")  # GPT-2 ties lm_head to wte
    assert m.lm_head.weight is m.transformer.wte.weight
    client, server = split_model(m, 1)
    head = server.lm.lm_head.weight
    assert head is not client.stack.wte.weight
    torch.testing.assert_close(head, m.transformer.wte.weight, rtol=0, atol=0)
    with torch.no_grad():
        head.add_(1.0)
    assert not torch.equal(head, client.stack.wte.weight)
    assert m.lm_head.weight is m.transformer.wte.weight


@pytest.mark.parametrize("family", ["opt", "gpt2", "llama", "phi"])
@pytest.mark.parametrize("k", [0, 1, LAYERS])
def test_each_side_holds_only_its_own_parameters(family, k):
    m = model(family)
    client, server = split_model(m, k)
    emb_modules = [m.get_input_embeddings()]
    if family == "opt":
        emb_modules.append(m.model.decoder.embed_positions)
    if family == "gpt2":
        emb_modules.append(m.transformer.wpe)
    blocks = next(mod for mod in m.modules() if isinstance(mod, torch.nn.ModuleList))
    expected = {id(p) for mod in emb_modules + list(blocks[:k]) for p in mod.parameters()}
    assert {id(p) for p in client.parameters()} == expected
    assert not {id(p) for p in client.parameters()} & {id(p) for p in server.parameters()}
    total = sum(p.numel() for p in m.parameters())  # distinct tensors: a tied head counts once
    tied = m.get_output_embeddings().weight is m.get_input_embeddings().weight
    head = m.get_output_embeddings().weight.numel() if tied else 0

    summary = split_summary(client, server)
    assert summary.client.params == sum(mod.weight.numel() for mod in emb_modules) + sum(
        p.numel() for b in blocks[:k] for p in b.parameters()
    )
    assert summary.client.params + summary.server.params == total + head
    assert summary.shared == 0
    assert (summary.client.blocks, summary.server.blocks) == ((0, k), (k, LAYERS))
    assert "client" in str(summary) and f"{summary.client.params:,}" in str(summary)


def test_summary_counts_trainable():
    m = model("llama")
    client, server = split_model(m, 2)
    m.model.embed_tokens.weight.requires_grad_(False)
    summary = split_summary(client, server)
    assert summary.client.trainable == summary.client.params - m.model.embed_tokens.weight.numel()
    assert summary.server.trainable == summary.server.params
    assert summary.client.bytes == 4 * summary.client.params


@pytest.mark.parametrize("k", [-1, LAYERS + 1, 1.5, True, "2"])
def test_bad_split_layer(k):
    with pytest.raises(SplitError, match=r"split layer must be an integer in \[0, 4\] for LlamaForCausalLM"):
        split_model(model("llama"), k)


def test_unsplittable_models_say_why():
    with pytest.raises(SplitError, match="Linear.*no config.num_hidden_layers"):
        split_model(torch.nn.Linear(2, 2), 1)
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4)
    )
    with pytest.raises(
        SplitError, match=r"T5ForConditionalGeneration: expected exactly one ModuleList.*encoder\.block"
    ):
        split_model(t5, 1)
    with pytest.raises(TypeError):
        split_model("gpt2", 1)


def test_server_checks_its_input():
    client, server = split_model(model("llama"), 1)
    with pytest.raises(TypeError, match="hosl.Activation"):
        server(torch.zeros(1, 3, 32))
    with pytest.raises(ValueError, match=r"\(batch, seq, 32\)"):
        server(Activation(torch.zeros(1, 3, 16)))


def test_activation_fields():
    ids, mask, _ = batch()
    client, _ = split_model(model("llama"), 1)
    h = client(input_ids=ids, attention_mask=mask)
    assert set(h.tensors()) == {"hidden", "attention_mask"}
    assert Activation.from_tensors(h.tensors()).attention_mask is mask
    with pytest.raises(ValueError, match="only its own fields"):
        Activation.from_tensors({"hidden": h.hidden, "labels": ids})
    d = h.detach(requires_grad=True)
    assert d.hidden.is_leaf and d.hidden.requires_grad and h.hidden.grad_fn is not None


# --- load_client / load_server -----------------------------------------------------------------


@pytest.mark.parametrize(
    "family,overrides,save",
    [
        ("llama", {"tie_word_embeddings": True}, {}),
        ("gpt2", {}, {"max_shard_size": "20KB"}),  # sharded, with an index
        ("opt", {}, {}),
        ("gemma2", {}, {}),
    ],
    ids=["llama-tied", "gpt2-sharded", "opt", "gemma2"],
)
def test_load_side_equals_split(tmp_path, family, overrides, save):
    m = model(family, **overrides)
    m.save_pretrained(tmp_path, **save)
    ids, mask, labels = batch(padding="left")
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask, labels=labels)
        for k in (0, 2, LAYERS):
            client, server = load_client(tmp_path, k), load_server(tmp_path, k)
            assert not client.training and not server.training
            out = server(client(input_ids=ids, attention_mask=mask), labels=labels)
            torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
            torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-5)
            c_ref, s_ref = split_model(m, k)
            assert split_summary(client, server) == split_summary(c_ref, s_ref)
            assert all(p.device.type == "cpu" for p in [*client.parameters(), *server.parameters()])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_loaded_client_is_one_buffer_that_zo_adopts(tmp_path, family, device):
    """Read straight into one buffer on the device (on a GPU too: no second copy while loading)."""
    from hosl.zo import ZOParams

    m = model(family, tie_word_embeddings=True) if family == "llama" else model(family)
    m.save_pretrained(tmp_path)
    client = load_client(tmp_path, 2, device=device)
    params = list(client.parameters())
    base = params[0].untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == base and p.device.type == device for p in params)
    values = [p.detach().clone() for p in params]
    zo_params = ZOParams(list(client.named_parameters()))
    assert zo_params.flat.flat.data_ptr() == base  # adopted: the weights were not copied
    assert all(torch.equal(p, v) for p, v in zip(client.parameters(), values))
    ids, mask, _ = batch()
    with torch.no_grad():
        c_ref, _ = split_model(m, 2)
        hidden = client(input_ids=ids.to(device), attention_mask=mask.to(device)).hidden.cpu()
        atol = 0 if device == "cpu" else 1e-5  # another device's kernels round differently
        torch.testing.assert_close(hidden, c_ref(input_ids=ids, attention_mask=mask).hidden, rtol=0, atol=atol)
    last = load_client(tmp_path, 2, device=device)  # --client-train-blocks 1: the last block's run of the buffer
    frozen = train_last_blocks(last, 1)
    trained = [(n, p) for n, p in last.named_parameters() if p.requires_grad]
    assert frozen == 1 and trained and all(".1." in n for n, _ in trained)
    start = trained[0][1].data_ptr()
    zo_params = ZOParams(trained)
    flat = zo_params.flat.flat
    assert flat.data_ptr() == start and flat.untyped_storage().data_ptr() == base_of(last)  # a view: no copy


def base_of(module) -> int:
    return next(module.parameters()).untyped_storage().data_ptr()


def test_load_from_pytorch_bin(tmp_path):
    m = model("gpt2")
    m.config.save_pretrained(tmp_path)
    state = {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    torch.save(state, tmp_path / "pytorch_model.bin")
    ids, mask, _ = batch()
    with torch.no_grad():
        out = load_server(tmp_path, 2)(load_client(tmp_path, 2)(input_ids=ids, attention_mask=mask))
        torch.testing.assert_close(out.logits, m(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-5)


def test_load_casts_to_dtype(tmp_path):
    m = model("llama")
    m.save_pretrained(tmp_path)
    client = load_client(tmp_path, 1, dtype=torch.bfloat16)
    assert {p.dtype for p in client.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(
        client.stack.embed_tokens.weight, m.model.embed_tokens.weight.to(torch.bfloat16), rtol=0, atol=0
    )


def test_load_errors(tmp_path):
    with pytest.raises(SplitError, match="not a local model directory"):
        load_client(tmp_path / "nowhere", 1)
    m = model("llama")
    m.save_pretrained(tmp_path)
    with pytest.raises(SplitError, match=r"split layer must be an integer in \[0, 4\]"):
        load_server(tmp_path, 9)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(SplitError, match="holds no model.safetensors"):
        load_client(tmp_path, 1)


def test_load_reports_a_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    model("llama").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    load_server(tmp_path, 1)  # the server does not need block 0
    with pytest.raises(SplitError, match=r"no tensor for model\.layers\.0\.mlp\.up_proj\.weight"):
        load_client(tmp_path, 1)


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    import hosl.loading

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    import transformers  # noqa: F401  (its import cost is not the model's)
    # Neither is torch's one-time set-up of meta-device kernels (about 150 MB of code and tables).
    torch.nn.Embedding(2, 2, device="meta")
    base = status("VmRSS:")
    side = getattr(hosl.loading, "load_" + sys.argv[2])(sys.argv[1], 1)
    own = sum(p.numel() * p.element_size() for p in {id(p): p for p in side.parameters()}.values())
    print(json.dumps({"extra": status("VmHWM:") - base, "own": own}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the high-water mark from /proc")
def test_client_peak_memory_while_loading_stays_near_its_weights(tmp_path):
    """An OPT-125M-shaped checkpoint (500 MB in float32), cut after block 1: the client process's
    resident high-water mark while loading is its own weights plus a little, far from the model."""
    cfg = config(
        "opt", hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
        vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768,
    )  # fmt: skip
    with torch.device("meta"):
        full = transformers.AutoModelForCausalLM.from_config(cfg)
    full_bytes = sum(p.numel() * 4 for p in full.parameters())
    # Write the checkpoint without building the model in memory: zeros per tensor, one at a time.
    from safetensors.torch import save_file

    names = dict(full.named_parameters())
    save_file({n: torch.zeros(p.shape) for n, p in names.items()}, tmp_path / "model.safetensors")
    cfg.save_pretrained(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path), "client"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    import json

    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert rec["own"] < full_bytes / 2
    assert rec["extra"] < 1.15 * rec["own"] + 48 * 2**20, (rec, full_bytes)


def test_package_exports():
    assert hosl.split_model is split_model and hosl.Activation is Activation
    assert hosl.load_client is load_client and hosl.load_server is load_server
    assert hosl.split_summary is split_summary


def test_a_split_that_loses_a_module_is_refused(monkeypatch):
    """OLMo's final norm has no parameters; a cut that placed only modules with parameters left it on
    the client's side too (logits off by 0.2). split_model's own check must refuse such a pair."""
    real = split._find_cut

    def lossy(model):
        cut = real(model)
        cut.post = [
            c for c in cut.post if next(model.get_submodule(".".join([*cut.stack_path, c])).parameters(), None)
        ]
        return cut

    m = model("olmo")
    assert split.check_split(m, *split_model(m, 1)) == 0.0
    monkeypatch.setattr(split, "_find_cut", lossy)
    with pytest.raises(SplitError, match="the split of OlmoForCausalLM at k = 1 disagrees .* differ by up to"):
        split_model(m, 1)
    wrong = split_model(m, 1, check=False)  # unchecked: the pair before the fix
    with pytest.raises(SplitError, match="differ by up to"):
        split.check_split(m, *wrong)
