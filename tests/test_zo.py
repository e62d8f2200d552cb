"""ZO steps (hosl.zo) against independent computations: the update against w - lr/Q sum g z built from
hosl.noise.gaussian, row-sparse passes against dense ones restricted to the rows, and cut-grad's
projection against the loss difference it linearises."""

from types import SimpleNamespace

import pytest
import torch

from hosl import estimators, noise, zo
from hosl.plan import StepPlan


def _plan(estimator="central", q=2, mu=1e-3, seed=5, zo_step="sgd"):
    """The step plan of a hosl run with this estimator: its seeds, probe passes and end."""
    cfg = SimpleNamespace(
        method="hosl", q=q, mu=mu, seed=seed, zo_estimator=estimator, server_grad="clean", zo_step=zo_step
    )
    return StepPlan.of(cfg)


def _named():
    """A matrix, a bias and an embedding table, as a client would have them."""
    torch.manual_seed(0)
    return [
        ("proj.weight", torch.nn.Parameter(torch.randn(6, 5))),
        ("proj.bias", torch.nn.Parameter(torch.randn(5))),
        ("embed.weight", torch.nn.Parameter(torch.randn(11, 7))),
    ]


def _expected_update(w0, seeds, grads, lr, weight_decay, decayed_spans, offset=0, dist="gaussian"):
    """w0 - lr/Q * sum_q g_q z_q, then (1 - lr * wd) on the decayed spans: float64, from scratch."""
    w = w0.double().clone()
    for s, g in zip(seeds, grads):
        w -= lr / len(seeds) * g * noise.directions(w0.numel(), s, offset=offset, dist=dist).double()
    for lo, hi in decayed_spans:
        w[lo:hi] *= 1 - lr * weight_decay
    return w


@pytest.mark.parametrize("dist", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("estimator", sorted(estimators.ESTIMATORS))
@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("weight_decay", [0.0, 0.5], ids=["no-decay", "decay"])
def test_step_end_is_the_zo_sgd_update(estimator, q, weight_decay, dist):
    """The plan's probe passes and its end leave w - lr/Q sum_q g_q z_q (decayed on matrices), to
    float32 rounding, z_q Gaussian or Rademacher; the update is ~0.1 per element, so a flipped sign,
    a lost 1/Q, decay on the bias or the other distribution's directions fail by far."""
    named = _named()
    params = zo.ZOParams(named, dist=dist)
    if estimators.ESTIMATORS[estimator].exact:
        params.attach_tangents(torch.nn.ParameterDict({n.replace(".", "_"): p for n, p in named}))
    w0 = params.flat.flat.clone()
    plan = _plan(estimator, q)
    seeds = plan.seeds(3)
    grads = [1.5, -0.7, 2.0][:q]
    lr = 0.2
    for _ in plan.probes(params, 3):
        pass
    plan.end(params, 3, [(0, grads, None)], lr, weight_decay)
    # Decay on proj.weight (0:30) and embed.weight (35:112), not on proj.bias (30:35).
    expected = _expected_update(w0, seeds, grads, lr, weight_decay, [(0, 30), (35, 112)], dist=dist)
    torch.testing.assert_close(params.flat.flat.double(), expected, rtol=0, atol=2e-5)
    assert (params.flat.flat.double() - w0.double()).abs().max() > 0.05


@pytest.mark.parametrize("estimator", ["central", "cut-grad-one-sided"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3], ids=["small-g", "unit-g", "large-g"])
def test_a_normalized_step_moves_by_lr_over_the_rms_of_its_g(estimator, scale):
    """--zo-step normalized: w - lr/Q sum_q (g_q / rms(g)) z_q, the same step whatever the scale of g
    (the decay stays 1 - lr wd); a step whose g are all 0 only undoes its probes."""
    named = _named()
    params = zo.ZOParams(named)
    w0 = params.flat.flat.clone()
    plan = _plan(estimator, 3, zo_step="normalized")
    grads = [scale * g for g in (1.5, -0.7, 2.0)]
    rms = (sum(g * g for g in grads) / 3) ** 0.5
    for _ in plan.probes(params, 2):
        pass
    plan.end(params, 2, [(0, grads, None)], 0.2, 0.5)
    unit = [g / rms for g in grads]  # the g of scale 1 the update is made of
    expected = _expected_update(w0, plan.seeds(2), unit, 0.2, 0.5, [(0, 30), (35, 112)])
    torch.testing.assert_close(params.flat.flat.double(), expected, rtol=0, atol=2e-5)
    assert (params.flat.flat.double() - w0.double()).abs().max() > 0.05

    params = zo.ZOParams(_named())
    for _ in plan.probes(params, 2):
        pass
    assert not plan.end(params, 2, [(0, [0.0, 0.0, 0.0], None)], 0.2, 0.0)
    torch.testing.assert_close(params.flat.flat, w0, rtol=0, atol=1e-6)


def test_a_skipped_step_only_undoes_its_probes():
    params = zo.ZOParams(_named())
    w0 = params.flat.flat.clone()
    plan = _plan("central", 2)
    for _ in plan.probes(params, 0):
        pass
    assert plan.end(params, 0, [(0, None, None)], 0.2, 0.5)
    torch.testing.assert_close(params.flat.flat, w0, rtol=0, atol=1e-6)


def test_row_sparse_pass_is_the_dense_pass_on_those_rows():
    """With rows, the table gets the dense pass's bits on those rows and nothing elsewhere; the rest
    of the buffer gets the dense pass's bits."""
    named = _named()
    params = zo.ZOParams(named, offset=13, row_sparse=["embed.weight"])
    assert params.tables == [(35, 11, 7)]
    dense = params.flat.flat.clone()
    noise.add_(dense, [7, 8], [0.3, -0.1], offset=13)
    before = params.flat.flat.clone()
    rows = torch.tensor([9, 2, 2, 0])
    params.add_([7, 8], [0.3, -0.1], rows=[rows])
    after = params.flat.flat
    assert torch.equal(after[:35], dense[:35])
    table, dense_t, before_t = (t[35:].view(11, 7) for t in (after, dense, before))
    touched = torch.zeros(11, dtype=torch.bool)
    touched[rows] = True
    assert torch.equal(table[touched], dense_t[touched])
    assert torch.equal(table[~touched], before_t[~touched])
    assert not torch.equal(table[touched], before_t[touched])


def test_passes_with_other_row_tensors_get_their_own_rows():
    """ZOParams keeps the checked rows of the tensors a step's passes share: passes given other
    tensors (the next step's, then the first's again) each touch exactly their own rows."""
    named = _named()
    params = zo.ZOParams(named, row_sparse=["embed.weight"])
    table = params.flat.flat[35:].view(11, 7)
    for rows in (torch.tensor([9, 2]), torch.tensor([4]), torch.tensor([9, 2]), torch.tensor([0, 10])):
        before = table.clone()
        want = noise.add_rows_(table.clone(), rows, [3], [0.5], offset=35)
        params.add_([3], [0.5], rows=[rows])
        assert torch.equal(table, want), rows
        assert torch.equal(table[rows] != before[rows], torch.ones(len(rows), 7, dtype=torch.bool))


def test_row_sparse_step_end_is_the_update_on_those_rows():
    """The whole step with rows: touched rows and the dense part as the dense update, untouched rows
    only decayed, bit for bit."""
    params = zo.ZOParams(_named(), row_sparse=["embed.weight"])
    w0 = params.flat.flat.clone()
    plan = _plan("central", 2, seed=2)
    seeds, grads, lr = plan.seeds(1), [1.0, -2.0], 0.1
    rows = [torch.tensor([4, 1])]
    for _ in plan.probes(params, 1, rows):
        pass
    plan.end(params, 1, [(0, grads, rows)], lr, 0.5)
    expected = _expected_update(w0, seeds, grads, lr, 0.5, [(0, 30), (35, 112)])
    got = params.flat.flat.double()
    torch.testing.assert_close(got[:35], expected[:35], rtol=0, atol=2e-5)
    table, want, start = got[35:].view(11, 7), expected[35:].view(11, 7), w0[35:].view(11, 7)
    torch.testing.assert_close(table[[1, 4]], want[[1, 4]], rtol=0, atol=2e-5)
    untouched = [r for r in range(11) if r not in (1, 4)]
    assert torch.equal(params.flat.flat[35:].view(11, 7)[untouched], start[untouched] * (1 - lr * 0.5))


def test_rows_round_trip_through_the_log_encoding():
    rows = [torch.tensor([40, 3, 3, 17, 0]), torch.tensor([], dtype=torch.int64), None]
    encoded = zo.encode_rows(rows)
    assert encoded == [[0, 3, 14, 23], [], None]
    decoded = zo.decode_rows(encoded)
    assert torch.equal(decoded[0], torch.tensor([0, 3, 17, 40])) and decoded[1].numel() == 0
    assert decoded[2] is None


def test_a_table_without_rows_gets_the_dense_pass():
    params = zo.ZOParams(_named(), row_sparse=["embed.weight"])
    dense = params.flat.flat.clone()
    noise.add_(dense, [3], [0.5])
    params.add_([3], [0.5], rows=[None])
    assert torch.equal(params.flat.flat, dense)


def test_lookup_recorder_sees_the_rows_each_table_is_read_at():
    """hosl.rows.LookupRecorder: the indices of every F.embedding call on a row-sparse table."""
    from hosl.rows import LookupRecorder, embedding_tables, step_rows

    torch.manual_seed(0)
    tokens, positions, head = torch.nn.Embedding(30, 4), torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2)
    model = torch.nn.ModuleDict({"tokens": tokens, "positions": positions, "head": head})
    assert embedding_tables(model) == ["tokens.weight", "positions.weight"]
    params = zo.ZOParams(list(model.named_parameters()), row_sparse=embedding_tables(model))
    ids = torch.tensor([[5, 7, 5], [29, 0, 7]])
    with LookupRecorder(params) as recorder:
        head(tokens(ids) + positions(torch.arange(3)))
    rows = step_rows(params, {"input_ids": ids}, recorder)
    assert [r.tolist() for r in rows] == [[0, 5, 7, 29], [0, 1, 2]]
    # No recorder: the token table from the batch's ids, the others dense.
    assert step_rows(params, {"input_ids": ids}, token_table=tokens.weight)[1] is None


def test_row_sparse_needs_a_table_of_the_buffer():
    with pytest.raises(ValueError, match="not here"):
        zo.ZOParams(_named(), row_sparse=["nope.weight"])
    with pytest.raises(ValueError, match="2-D"):
        zo.ZOParams(_named(), row_sparse=["proj.bias"])


def test_cut_grad_projection_is_the_loss_difference_to_first_order():
    """On a smooth two-layer map h(w) and loss L(h), <dL/dh, (h+ - h-)/2mu> equals
    (L(h+) - L(h-))/2mu to first order, probe by probe; a wrong sign or a lost 1/(2 mu) fails."""
    torch.manual_seed(0)
    first = torch.nn.Linear(12, 16)
    head = torch.nn.Linear(16, 3)
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    params = zo.ZOParams(list(first.named_parameters()))
    for p in first.parameters():
        p.requires_grad_(False)

    def loss_of(h):
        return torch.nn.functional.cross_entropy(head(torch.tanh(h)), y)

    h = first(x).requires_grad_(True)
    loss_of(h).backward()
    grad_h = h.grad.detach()
    mu = 1e-3
    plan = _plan("cut-grad", 4, mu, seed=0)
    cut, central, kept = [], [], {}
    with torch.no_grad():
        for forward in plan.probes(params, 0):
            kept[forward.key] = first(x)
            if forward.sign < 0:
                central.append(
                    (loss_of(kept[(forward.probe, 1)]).item() - loss_of(kept[forward.key]).item()) / (2 * mu)
                )
            direction = plan.estimator.difference(kept, forward.probe)
            if direction is not None:
                cut.append(plan.estimator.project(grad_h, direction, mu))
    for a, b in zip(cut, central):
        assert abs(a - b) <= 0.02 * abs(b) + 2e-3, (cut, central)
    assert max(abs(b) for b in central) > 0.05


# -- scratch probes ---------------------------------------------------------------------------------


def _client_of(family, k=2, row_sparse=True, probes="scratch", dist="gaussian"):
    from _tiny_models import model

    from hosl.rows import embedding_tables
    from hosl.split import split_model

    client, _ = split_model(model(family), k)
    named = [(n, p) for n, p in client.named_parameters() if p.requires_grad]
    for _, p in named:
        p.requires_grad_(False)
    tables = set(embedding_tables(client)) if row_sparse else set()
    params = zo.ZOParams(named, row_sparse=[n for n, _ in named if n in tables], probes=probes, dist=dist)
    if probes == "scratch":
        params.attach(client)
    return client, params


def _hidden(client, ids, mask):
    with torch.no_grad():
        return client(input_ids=ids, attention_mask=mask).hidden


FAMILIES_SAMPLE = ["opt", "gpt2", "llama", "gemma2", "phi"]


@pytest.mark.parametrize(
    "family,dist", [*((f, "gaussian") for f in FAMILIES_SAMPLE), ("llama", "rademacher"), ("opt", "rademacher")]
)
def test_a_scratch_probe_sees_the_perturbed_weights_and_leaves_w_exactly(family, dist):
    """Under a scratch probe the forward is the forward of weights that a whole-buffer pass set to
    w + c z (bit for bit, +mu and -mu, on the batch's rows of the token table), and afterwards the
    weights are w, bit for bit. The reference moves a second copy's weights with add_ passes."""
    from _tiny_models import batch

    ids, mask, _ = batch()
    client, params = _client_of(family, dist=dist)
    ref_client, ref = _client_of(family, probes="inplace", dist=dist)
    rows = [torch.unique(ids)] + [None] * (len(params.tables) - 1)
    w0 = params.flat.flat.clone()
    seed, mu = estimators.probe_seed(3, 1, 0), 1e-3
    for scale in (mu, -mu):
        with params.perturbed(seed, scale, rows):
            probe = _hidden(client, ids, mask)
        assert torch.equal(params.flat.flat, w0)
        ref.flat.flat.copy_(w0)
        ref.add_([seed], [scale], rows=rows)
        assert torch.equal(probe, _hidden(ref_client, ids, mask))
        assert not torch.equal(probe, _hidden(client, ids, mask))  # the probe did move the output


def test_scratch_probes_leave_untouched_rows_alone_and_restore_after_a_failed_forward():
    client, params = _client_of("llama")
    w0 = params.flat.flat.clone()
    calls = []

    def boom(module, args):
        calls.append(1)
        raise RuntimeError("boom")

    # After the probe's own pre-hook: down_proj is perturbed and never reaches its restoring hook.
    handle = client.stack.layers[1].mlp.down_proj.register_forward_pre_hook(boom)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(RuntimeError, match="boom"):
        with params.perturbed(11, 1e-2, [torch.tensor([5, 6, 7])]):
            _hidden(client, ids, torch.ones_like(ids))
    handle.remove()
    assert calls and torch.equal(params.flat.flat, w0)


def test_scratch_probes_refuse_weights_their_modules_do_not_read():
    """A ZO parameter read outside its module's forward would see no noise: the probe says so."""

    class Reads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(3, 3)
            self.free = torch.nn.Linear(3, 3)  # its weight is read, its forward never runs

        def forward(self, x):
            return self.inner(x) @ self.free.weight

    m = Reads()
    params = zo.ZOParams(list(m.named_parameters()), probes="scratch")
    params.attach(m)
    with pytest.raises(RuntimeError, match="free holds ZO weights but did not run"):
        with params.perturbed(1, 1e-3):
            m(torch.ones(1, 3))
    with pytest.raises(ValueError, match="no module of the model holds"):
        zo.ZOParams([("w", torch.nn.Parameter(torch.ones(3)))], probes="scratch").attach(m)


@pytest.mark.parametrize("estimator", ["central", "forward"])
def test_a_scratch_step_is_the_update_alone(estimator):
    """With scratch probes a step's end is one pass, the update: the weights are w0 - lr/Q sum g z
    after the plan's probes, to float32 rounding, with no probe residue in them."""
    from types import SimpleNamespace

    from hosl.plan import StepPlan

    m = torch.nn.Linear(5, 4)
    named = list(m.named_parameters())
    params = zo.ZOParams(named, probes="scratch")
    params.attach(m)
    w0 = params.flat.flat.clone()
    cfg = SimpleNamespace(
        method="zo-full", q=2, mu=1e-3, seed=4, zo_estimator=estimator, server_grad="clean", zo_step="sgd"
    )
    plan = StepPlan.of(cfg)
    for _ in plan.probes(params, 7):
        m(torch.ones(2, 5))
        assert torch.equal(params.flat.flat, w0)
    grads = [0.5, -1.5]
    plan.end(params, 7, [(0, grads, None)], 0.1, 0.0)
    expected = _expected_update(w0, plan.seeds(7), grads, 0.1, 0.0, [])
    torch.testing.assert_close(params.flat.flat.double(), expected, rtol=0, atol=1e-7)


def test_in_place_probes_leave_a_residue_that_depends_on_the_seed_and_scratch_probes_none():
    """Why many clients probe in scratch copies: two copies of w probed in place with different
    seeds (+mu, -2mu, +mu) come back with different last bits; probed in scratch they come back w."""
    m = torch.nn.Linear(64, 64)
    backs = []
    for probes in ("inplace", "scratch"):
        for seed in (1, 2):
            copy = torch.nn.Linear(64, 64)
            copy.load_state_dict(m.state_dict())
            params = zo.ZOParams(list(copy.named_parameters()), probes=probes)
            if probes == "scratch":
                params.attach(copy)
                for sign in (1, -1):
                    with params.perturbed(seed, sign * 1e-2):
                        copy(torch.ones(1, 64))
            else:
                for scale in (1e-2, -2e-2, 1e-2):
                    params.add_([seed], [scale])
            backs.append(params.flat.flat.clone())
    w = torch.cat([m.weight.detach().reshape(-1), m.bias.detach()])
    assert not torch.equal(backs[0], backs[1]) and not torch.equal(backs[0], w)
    assert torch.equal(backs[2], w) and torch.equal(backs[3], w)


# --- weights without a float32 master ----------------------------------------------------------------


def _low_named(dtype):
    return [(n, torch.nn.Parameter(p.detach().to(dtype))) for n, p in _named()]


def _rounded_reference(w0, terms, seed, dtype, offset=0):
    """w0 plus the terms' noise in float32 (the noise primitive, tested on its own), then rounded
    stochastically by other means: the neighbours toward and away from zero from torch.nextafter,
    the one away taken where the seeded stream's uniform is above 1 - the distance, in float64."""
    x = w0.float()
    noise.add_(x, *terms, offset=offset)
    nearest, xs = x.to(dtype), x.double()
    zero, inf = torch.zeros_like(nearest), torch.full_like(nearest, float("inf")).copysign(x.to(dtype))
    toward = torch.where(nearest.double().abs() > xs.abs(), torch.nextafter(nearest, zero), nearest)
    away = torch.nextafter(toward, inf)
    p = (xs - toward.double()).abs() / (away.double() - toward.double()).abs()
    u = noise.uniform_(torch.empty_like(x), seed, offset=offset).double()  # tested on its own
    return torch.where(u > 1 - p, away, toward)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q", [1, 3])
def test_without_a_master_the_step_end_is_the_stochastically_rounded_update(dtype, q):
    """A step's end on a low-precision buffer: w0 - lr/Q sum_q g_q z_q in float32, each element rounded
    to one of its two neighbours as the seeded uniform says, bit for bit; the update is ~0.1 per
    element, so a flipped sign or a lost 1/Q fail by far."""
    params = zo.ZOParams(_low_named(dtype), probes="scratch", master=False)
    assert params.flat.flat.dtype == dtype
    w0 = params.flat.flat.clone()
    plan = _plan("cut-grad", q)
    seeds, grads, lr = plan.seeds(3), [1.5, -0.7, 2.0][:q], 0.2
    plan.end(params, 3, [(0, grads, None)], lr, 0.0)
    scales = [0.0 - lr * g / q for g in grads]
    expected = _rounded_reference(w0, (seeds, scales), zo._round_seed("add", seeds, scales), dtype)
    assert torch.equal(params.flat.flat.view(torch.int16), expected.view(torch.int16))
    assert (params.flat.flat.double() - w0.double()).abs().max() > 0.05


def test_without_a_master_rows_get_the_dense_bits_and_decay_is_rounded_too():
    """With rows, the table's chosen rows get what the dense rounded pass gives them and the other
    rows keep theirs; decay is its own rounded pass, seeded by the step's seeds."""
    dense = zo.ZOParams(_low_named(torch.bfloat16), offset=13, probes="scratch", master=False)
    sparse = zo.ZOParams(
        _low_named(torch.bfloat16), offset=13, row_sparse=["embed.weight"], probes="scratch", master=False
    )
    before = sparse.flat.flat.clone()
    seeds = estimators.step_seeds(2, 0, 2)
    rows = torch.tensor([9, 2, 2, 0])
    for p in (dense, sparse):
        p.add_(seeds, [0.3, -0.1], rows=[rows] if p is sparse else None)
    table, dense_t, before_t = (t[35:].view(11, 7) for t in (sparse.flat.flat, dense.flat.flat, before))
    touched = torch.zeros(11, dtype=torch.bool)
    touched[rows] = True
    assert torch.equal(sparse.flat.flat[:35], dense.flat.flat[:35])
    assert torch.equal(table[touched], dense_t[touched]) and torch.equal(table[~touched], before_t[~touched])
    # Decay: 1 - 1e-3 is below half a bfloat16 ulp of these weights' scale; rounded to nearest it
    # would change nothing, rounded stochastically it shrinks the decayed tensors on average.
    w = torch.nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))
    decayed = zo.ZOParams([("w", w)], probes="scratch", master=False)
    for step in range(200):
        decayed.decay_(1 - 1e-3, key=estimators.step_seeds(0, step, 1))
    assert abs(decayed.flat.flat.double().mean().item() - (1 - 1e-3) ** 200) < 0.01
    with pytest.raises(ValueError, match="needs the step's seeds"):
        decayed.decay_(0.5)


def test_without_a_master_updates_below_an_ulp_move_the_weights_on_average():
    """An update a tenth of an ulp per element: rounded to nearest it vanishes; rounded
    stochastically its projection on z is the update's, to a few percent."""
    w = torch.nn.Parameter(torch.ones(200_000, dtype=torch.bfloat16))
    params = zo.ZOParams([("w", w)], probes="scratch", master=False)
    scale = 0.1 * 2.0**-8  # a tenth of the ulp below 1 (2^-8) and a twentieth of the one above
    params.add_([7], [scale])
    z = noise.gaussian(200_000, 7).double()
    moved = params.flat.flat.double() - 1.0
    assert (moved != 0).float().mean() > 0.02
    assert abs((moved * z).sum().item() / (z * z).sum().item() / scale - 1) < 0.05


def test_without_a_master_the_probes_must_be_scratch_ones():
    with pytest.raises(ValueError, match="need scratch probes"):
        zo.ZOParams(_low_named(torch.bfloat16), master=False)
    assert zo.ZOParams(_low_named(torch.float32), master=False).native is False  # float32: its own master


# -- the exact estimator: forward-mode tangents --------------------------------------------------------


def _tangent_client(family, dtype=torch.float32, master=True, dist="gaussian"):
    """A 2-block client of `family` whose buffer carries tangents (row-sparse token table)."""
    from _tiny_models import model

    from hosl.rows import embedding_tables
    from hosl.split import split_model

    client, _ = split_model(model(family).to(dtype), 2)
    for m in client.modules():
        if isinstance(m, torch.nn.Embedding):
            m.padding_idx = None  # its backward drops the padding row's gradient, which the forward reads
    named = [(n, p) for n, p in client.named_parameters() if p.requires_grad]
    for _, p in named:
        p.requires_grad_(False)
    tables = set(embedding_tables(client))
    probes = "inplace" if master else "scratch"
    params = zo.ZOParams(
        named, row_sparse=[n for n, _ in named if n in tables], probes=probes, master=master, dist=dist
    )
    params.attach_tangents(client)
    return client, params


def _tangent_of(client, params, seed, ids, mask):
    import torch.autograd.forward_ad as fwAD

    with torch.no_grad(), params.tangent(seed), zo.forward_mode():
        out = client(input_ids=ids, attention_mask=mask).hidden
        return fwAD.unpack_dual(out).tangent


@pytest.mark.parametrize(
    "family,dist", [*((f, "gaussian") for f in FAMILIES_SAMPLE), ("llama", "rademacher"), ("opt", "rademacher")]
)
def test_a_tangent_forward_is_the_directional_derivative_autograd_gives(family, dist):
    """cut-grad-jvp's g = < dL/dh, J_w h . z > from a tangent forward (attention on SDPA's math
    backend, the tangent generated module by module, Gaussian or Rademacher) equals
    < grad_w (dL/dh . h(w)), z > from torch.autograd with z built from noise.directions, to float32
    rounding; the weights are left bit for bit as they were."""
    from _tiny_models import batch

    ids, mask, _ = batch()
    client, params = _tangent_client(family, dist=dist)
    w0 = params.flat.flat.clone()
    grad_h = torch.randn(_hidden(client, ids, mask).shape, generator=torch.Generator().manual_seed(0))
    for p in params.flat.params:
        p.requires_grad_(True)
    (client(input_ids=ids, attention_mask=mask).hidden * grad_h).sum().backward()
    grad_w = torch.cat([p.grad.reshape(-1) for p in params.flat.params]).double()
    for p in params.flat.params:
        p.requires_grad_(False)
    jvp = estimators.ESTIMATORS["cut-grad-jvp"]
    for probe in range(3):
        seed = estimators.probe_seed(9, 0, probe)
        z = noise.directions(params.numel, seed, dist=dist).double()
        want = float(grad_w @ z)
        tangent = _tangent_of(client, params, seed, ids, mask)
        got = jvp.project(grad_h, tangent, 1e-3)
        assert abs(got - want) <= 1e-4 * abs(want) + 1e-5 * float(grad_w.norm() * z.norm()), (got, want)
        assert abs(want) > 1e-3
    assert jvp.exact and torch.equal(params.flat.flat, w0)
    assert all(isinstance(p, torch.nn.Parameter) for p in client.parameters())  # put back after each module


def _reference_tangent(family, client, params, seed, ids, mask) -> torch.Tensor:
    """J_w h . z in float64 by torch.func.jvp on a float64 copy of `client`, z built from
    noise.gaussian at each parameter's place in the buffer: no hook, no dual swap of hosl's."""
    from _tiny_models import model
    from torch.func import functional_call, jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hosl.split import split_model

    starts = {id(p): s for p, s in zip(params.flat.params, params.flat.offsets)}
    placed = {n: starts[id(p)] for n, p in client.named_parameters() if id(p) in starts}
    ref, _ = split_model(model(family).double(), 2)
    ref.load_state_dict({k: v.double() for k, v in client.state_dict().items()})
    z = noise.gaussian(params.numel, seed).double()
    primals = {n: p.detach() for n, p in ref.named_parameters() if n in placed}
    tangents = {n: z[placed[n] : placed[n] + p.numel()].view_as(p) for n, p in primals.items()}

    def hidden(weights):
        return functional_call(ref, weights, (), {"input_ids": ids, "attention_mask": mask}).hidden

    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        return jvp(hidden, (primals,), (tangents,))[1]


def test_jvp_in_bfloat16_is_several_times_closer_than_a_central_difference():
    """A bfloat16 client without a master: g from a tangent forward, against a float64 reference
    (torch.func.jvp), has a median relative error several times below a central difference of two
    bfloat16 activations (their difference is at the scale of their rounding). A dropped tangent
    (error 1) or a flipped one (error 2) fails; so does a JVP no better than the difference."""
    from _tiny_models import batch

    ids, mask, _ = batch()
    client, params = _tangent_client("llama", torch.bfloat16, master=False)
    params.attach(client)  # scratch probes, for the central difference
    grad_h = torch.randn(_hidden(client, ids, mask).shape, generator=torch.Generator().manual_seed(1))
    jvp, central = estimators.ESTIMATORS["cut-grad-jvp"], estimators.ESTIMATORS["central"]
    mu = 1e-2  # above half a bfloat16 ulp of these weights (check_mu's floor), as a run must be
    zo.check_mu(params, mu)
    errors: dict[str, list[float]] = {"jvp": [], "central": []}
    for probe in range(8):
        seed = estimators.probe_seed(4, 0, probe)
        want = float((_reference_tangent("llama", client, params, seed, ids, mask) * grad_h.double()).sum())
        got_jvp = jvp.project(grad_h, _tangent_of(client, params, seed, ids, mask), mu)
        kept = {}
        for sign in (+1, -1):
            with params.perturbed(seed, sign * mu):
                kept[(0, sign)] = _hidden(client, ids, mask)
        got_central = central.project(grad_h, central.difference(kept, 0), mu)
        errors["jvp"].append(abs(got_jvp - want) / abs(want))
        errors["central"].append(abs(got_central - want) / abs(want))
    jvp_err, central_err = (sorted(e)[len(e) // 2] for e in (errors["jvp"], errors["central"]))
    assert jvp_err * 4 < central_err, (jvp_err, central_err)
    assert jvp_err < 0.1, jvp_err
