import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip import ClipLoss
from open_clip.loss import SigLipLoss

import open_clip_3t.loss as loss_module
from open_clip_3t import ThreeTowersLoss, ThreeTowersSigLipLoss

B, D, DH = 5, 4, 3
NAMES = ("image_features", "text_features", "image_third_features", "third_image_features",
         "text_third_features", "third_text_features")


SCALES = {"logit_scale": 10.0, "logit_scale_image_third": 7.0, "logit_scale_text_third": 3.0}
BIASES = {"logit_bias": -2.0, "logit_bias_image_third": 0.5, "logit_bias_text_third": -1.0}


def features(batch=B, seed=0, requires_grad=False, biases=False):
    g = torch.Generator().manual_seed(seed)
    dims = (D, D, DH, DH, DH, DH)
    out = {n: F.normalize(torch.randn(batch, d, generator=g, dtype=torch.float64), dim=-1) for n, d in zip(NAMES, dims)}
    out.update({k: torch.tensor(v, dtype=torch.float64) for k, v in {**SCALES, **(BIASES if biases else {})}.items()})
    if requires_grad:
        for v in out.values():
            v.requires_grad_(True)
    return out


def hand_clip_loss(a, b, s):
    """1/2 (CE(s a b^T, I) + CE(s b a^T, I)), written out with explicit sums."""
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        row = [s * float(a[i] @ b[j]) for j in range(n)]
        col = [s * float(b[i] @ a[j]) for j in range(n)]
        total += -row[i] + math.log(sum(math.exp(x) for x in row))
        total += -col[i] + math.log(sum(math.exp(x) for x in col))
    return total / (2 * n)


def test_each_term_matches_hand_computation():
    x = features()
    out = ThreeTowersLoss()(**x, output_dict=True)
    assert set(out) == {"contrastive_loss", "image_third_loss", "text_third_loss"}
    expect = {
        "contrastive_loss": hand_clip_loss(x["image_features"], x["text_features"], 10.0) / 3,
        "image_third_loss": hand_clip_loss(x["image_third_features"], x["third_image_features"], 7.0) / 3,
        "text_third_loss": hand_clip_loss(x["text_third_features"], x["third_text_features"], 3.0) / 3,
    }
    for k, v in expect.items():
        assert out[k].item() == pytest.approx(v, rel=1e-10), k
    total = ThreeTowersLoss()(**x)
    assert total.item() == pytest.approx(sum(expect.values()), rel=1e-10)


def test_weights_scale_and_drop_terms():
    x = features(seed=1)
    full = ThreeTowersLoss()(**x, output_dict=True)
    out = ThreeTowersLoss(weights=(2.0, 0.0, 0.5))(**x, output_dict=True)
    assert set(out) == {"contrastive_loss", "text_third_loss"}  # weight 0 drops the term
    assert out["contrastive_loss"].item() == pytest.approx(2.0 * full["contrastive_loss"].item(), rel=1e-12)
    assert out["text_third_loss"].item() == pytest.approx(0.5 * full["text_third_loss"].item(), rel=1e-12)


def test_l2_transfer_matches_hand_computation():
    x = features(seed=2)
    out = ThreeTowersLoss(transfer="l2")(**x, output_dict=True)
    for name, a, b in (("image_third_loss", "image_third_features", "third_image_features"),
                       ("text_third_loss", "text_third_features", "third_text_features")):
        hand = sum(float(((x[a][i] - x[b][i]) ** 2).sum()) for i in range(B)) / B / 3
        assert out[name].item() == pytest.approx(hand, rel=1e-10)
    # the main term stays contrastive
    assert out["contrastive_loss"].item() == pytest.approx(
        hand_clip_loss(x["image_features"], x["text_features"], 10.0) / 3, rel=1e-10)


def test_weight_three_on_main_term_equals_openclip_clip_loss_and_gradients():
    x = features(seed=3, requires_grad=True)
    ours = ThreeTowersLoss(weights=(3.0, 0.0, 0.0))(**x)
    ours.backward()
    grads = [x[k].grad.clone() for k in ("image_features", "text_features", "logit_scale")]

    y = features(seed=3, requires_grad=True)
    ref = ClipLoss()(y["image_features"], y["text_features"], y["logit_scale"])
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    for g, k in zip(grads, ("image_features", "text_features", "logit_scale")):
        torch.testing.assert_close(g, y[k].grad, rtol=1e-12, atol=1e-12)
    assert x["image_third_features"].grad is None  # dropped term: no gradient


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="give 3 loss weights, one per term: contrastive_loss, image_third_loss, "
                                         "text_third_loss"):
        ThreeTowersLoss(weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="give 5 loss weights"):
        ThreeTowersLoss(weights=(1.0, 1.0, 1.0), towers=("in21k", "places"))
    with pytest.raises(ValueError, match="transfer='mse'"):
        ThreeTowersLoss(transfer="mse")


# --- the sigmoid loss (SigLIP-3T) ---------------------------------------------------------------------------------

def hand_sigmoid_loss(a, b, t, bias):
    """-mean_i sum_j log sigmoid(z_ij * (t * a_i . b_j + bias)), z_ij = 1 if i == j else -1, written out."""
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += math.log(1.0 / (1.0 + math.exp(-z * (t * float(a[i] @ b[j]) + bias))))
    return -total / n


SIGMOID_TERMS = (("contrastive_loss", "image_features", "text_features", "logit_scale", "logit_bias"),
                 ("image_third_loss", "image_third_features", "third_image_features", "logit_scale_image_third",
                  "logit_bias_image_third"),
                 ("text_third_loss", "text_third_features", "third_text_features", "logit_scale_text_third",
                  "logit_bias_text_third"))


def test_each_sigmoid_term_with_its_own_temperature_and_bias_matches_hand_computation():
    x = features(seed=5, biases=True)
    out = ThreeTowersSigLipLoss()(**x, output_dict=True)
    assert set(out) == {"contrastive_loss", "image_third_loss", "text_third_loss"}
    expect = {name: hand_sigmoid_loss(x[a], x[b], SCALES[s], BIASES[bias]) / 3
              for name, a, b, s, bias in SIGMOID_TERMS}
    assert len(set(round(v, 6) for v in expect.values())) == 3  # three different numbers: a swap would show
    for k, v in expect.items():
        assert out[k].item() == pytest.approx(v, rel=1e-10), k
    assert ThreeTowersSigLipLoss()(**x).item() == pytest.approx(sum(expect.values()), rel=1e-10)


def test_sigmoid_weights_scale_and_drop_terms_and_l2_transfer():
    x = features(seed=6, biases=True)
    full = ThreeTowersSigLipLoss()(**x, output_dict=True)
    out = ThreeTowersSigLipLoss(weights=(2.0, 0.0, 0.5))(**x, output_dict=True)
    assert set(out) == {"contrastive_loss", "text_third_loss"}
    assert out["contrastive_loss"].item() == pytest.approx(2.0 * full["contrastive_loss"].item(), rel=1e-12)
    assert out["text_third_loss"].item() == pytest.approx(0.5 * full["text_third_loss"].item(), rel=1e-12)
    l2 = ThreeTowersSigLipLoss(transfer="l2")(**x, output_dict=True)
    for name, a, b, _, _ in SIGMOID_TERMS[1:]:
        hand = sum(float(((x[a][i] - x[b][i]) ** 2).sum()) for i in range(B)) / B / 3
        assert l2[name].item() == pytest.approx(hand, rel=1e-10)
    assert l2["contrastive_loss"].item() == pytest.approx(full["contrastive_loss"].item(), rel=1e-12)


def test_sigmoid_main_term_is_openclip_siglip_loss_and_gradients():
    x = features(seed=7, requires_grad=True, biases=True)
    ours = ThreeTowersSigLipLoss(weights=(3.0, 0.0, 0.0))(**x)
    ours.backward()
    keys = ("image_features", "text_features", "logit_scale", "logit_bias")
    y = features(seed=7, requires_grad=True, biases=True)
    ref = SigLipLoss()(*(y[k] for k in keys))
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    for k in keys:
        torch.testing.assert_close(x[k].grad, y[k].grad, rtol=1e-12, atol=1e-12)
    assert x["image_third_features"].grad is None and x["logit_bias_image_third"].grad is None  # dropped terms


def test_sigmoid_loss_names_a_missing_bias():
    with pytest.raises(ValueError, match="needs the model outputs .*logit_bias.*: give the model config init_logit_bias"):
        ThreeTowersSigLipLoss()(**features(seed=8))


# --- several frozen towers (K = 2) ---------------------------------------------------------------------------------

TOWERS = ("in21k", "places")
K2_SCALES = {"logit_scale": 10.0, "logit_scale_image_in21k": 7.0, "logit_scale_text_in21k": 3.0,
             "logit_scale_image_places": 5.0, "logit_scale_text_places": 2.0}
K2_BIASES = {"logit_bias": -2.0, "logit_bias_image_in21k": 0.5, "logit_bias_text_in21k": -1.0,
             "logit_bias_image_places": 1.5, "logit_bias_text_places": -0.5}
K2_TERMS = (("contrastive_loss", "image_features", "text_features", "logit_scale", "logit_bias"),
            *((f"{side}_{t}_loss", f"{side}_{t}_features", f"{t}_{side}_features", f"logit_scale_{side}_{t}",
               f"logit_bias_{side}_{t}") for t in TOWERS for side in ("image", "text")))


def k2_features(batch=B, seed=0, requires_grad=False):
    """f, g and two towers' feature sets (the towers' heads map into spaces of widths 3 and 2), float64."""
    g = torch.Generator().manual_seed(seed)
    dims = {"image_features": D, "text_features": D, "image_in21k_features": DH, "in21k_image_features": DH,
            "text_in21k_features": DH, "in21k_text_features": DH, "image_places_features": 2,
            "places_image_features": 2, "text_places_features": 2, "places_text_features": 2}
    out = {n: F.normalize(torch.randn(batch, d, generator=g, dtype=torch.float64), dim=-1) for n, d in dims.items()}
    out.update({k: torch.tensor(v, dtype=torch.float64) for k, v in {**K2_SCALES, **K2_BIASES}.items()})
    for v in out.values():
        v.requires_grad_(requires_grad)
    return out


def test_two_towers_each_term_matches_hand_computation_and_default_is_the_mean():
    x = k2_features(seed=11)
    for loss, hand, scale in ((ThreeTowersLoss(towers=TOWERS), hand_clip_loss, lambda s, b: (s,)),
                              (ThreeTowersSigLipLoss(towers=TOWERS), hand_sigmoid_loss, lambda s, b: (s, b))):
        out = loss(**x, output_dict=True)
        assert list(out) == [name for name, *_ in K2_TERMS]
        expect = {name: hand(x[a], x[b], *scale({**K2_SCALES}[s], K2_BIASES[bias])) / 5  # the mean of 1 + 2K terms
                  for name, a, b, s, bias in K2_TERMS}
        assert len({round(v, 6) for v in expect.values()}) == 5  # five different numbers: a swap would show
        for k, v in expect.items():
            assert out[k].item() == pytest.approx(v, rel=1e-10), (type(loss).__name__, k)
        assert loss(**x).item() == pytest.approx(sum(expect.values()), rel=1e-10)


def test_two_towers_weights_per_term_and_l2_transfer():
    x = k2_features(seed=12)
    full = ThreeTowersLoss(towers=TOWERS)(**x, output_dict=True)
    out = ThreeTowersLoss(towers=TOWERS, weights=(1, 0, 2, 0.5, 0))(**x, output_dict=True)
    assert set(out) == {"contrastive_loss", "text_in21k_loss", "image_places_loss"}  # weight 0 drops a term
    for name, w in (("contrastive_loss", 1), ("text_in21k_loss", 2), ("image_places_loss", 0.5)):
        assert out[name].item() == pytest.approx(w * full[name].item(), rel=1e-12)
    l2 = ThreeTowersLoss(towers=TOWERS, transfer="l2")(**x, output_dict=True)
    for name, a, b, _, _ in K2_TERMS[1:]:
        assert l2[name].item() == pytest.approx(sum(float(((x[a][i] - x[b][i]) ** 2).sum()) for i in range(B)) / B / 5,
                                                rel=1e-10)


def test_two_towers_tuple_output_order():
    from open_clip_3t.loss import model_outputs
    x = k2_features(seed=13)
    outputs = model_outputs(TOWERS)
    assert outputs[:11] == ("image_features", "text_features", "logit_scale", "image_in21k_features",
                            "in21k_image_features", "text_in21k_features", "in21k_text_features",
                            "image_places_features", "places_image_features", "text_places_features",
                            "places_text_features")
    assert set(outputs) == set(x)
    loss = ThreeTowersSigLipLoss(towers=TOWERS)
    assert loss(*(x[k] for k in outputs)).item() == pytest.approx(loss(**x).item(), rel=1e-12)


# --- two processes, gloo -----------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(worker, *args, results_per_rank=1, timeout=120):
    """Run worker(rank, 2, port, *args, queue) in two spawned gloo processes; the items they put on the queue (each
    rank puts results_per_rank), after both exited cleanly."""
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, *args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=timeout) for _ in range(2 * results_per_rank)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def _rank_worker(rank, world_size, port, local_loss, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    calls = []
    real_all_gather = torch.distributed.nn.all_gather
    loss_module.torch.distributed.nn.all_gather = lambda t: calls.append(1) or real_all_gather(t)
    try:
        x = features(batch=2 * B, seed=4, requires_grad=False)
        local = {k: (v[rank * B:(rank + 1) * B] if v.ndim == 2 else v).clone().requires_grad_(True)
                 for k, v in x.items()}
        loss_fn = ThreeTowersLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world_size)
        loss = loss_fn(**local)
        loss.backward()
        grad = local["image_features"].grad
        # numpy, pickled by value: a tensor would be shared through this process's file descriptors, which the
        # reader may ask for after this process has exited (ConnectionResetError in multiprocessing's resource_sharer).
        queue.put((rank, loss.item(), len(calls), grad.numpy()))
    finally:
        loss_module.torch.distributed.nn.all_gather = real_all_gather
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("local_loss", [False, True])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(local_loss):
    world_size = 2
    results = sorted(run_two_ranks(_rank_worker, local_loss))

    x = features(batch=2 * B, seed=4, requires_grad=True)
    single = ThreeTowersLoss()(**x)
    single.backward()
    mean_rank_loss = sum(r[1] for r in results) / world_size
    assert mean_rank_loss == pytest.approx(single.item(), rel=1e-10)
    assert [r[2] for r in results] == [1, 1]  # all six feature sets in one collective
    # With gather_with_grad, rank r's feature gradient is d(sum of all ranks' losses)/dx_r = world_size * the
    # single-process gradient; DDP's average over ranks then gives the single-process parameter gradient.
    for rank, _, _, grad in results:
        torch.testing.assert_close(torch.from_numpy(grad), world_size * x["image_features"].grad[rank * B:(rank + 1) * B],
                                   rtol=1e-9, atol=1e-12)


DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def siglip_batch(n):
    """Images, token ids and fed-in h embeddings for the tiny SigLIP-3T model (float64, fixed seed)."""
    g = torch.Generator().manual_seed(9)
    return (torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64),
            torch.randint(1, 49407, (n, 32), generator=g),
            torch.randn(n, 64, generator=g, dtype=torch.float64))


def siglip_model():
    import open_clip
    torch.manual_seed(0)
    return open_clip.create_model("3T-tiny-sigmoid", third_tower=False, output_dict=True).double().train()


def _siglip_rank_worker(rank, world_size, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = siglip_model()
        images, texts, third = (t[rank * B:(rank + 1) * B] for t in siglip_batch(world_size * B))
        for impl in DIST_IMPLS:
            model.zero_grad()
            loss = ThreeTowersSigLipLoss(rank=rank, world_size=world_size, dist_impl=impl)(
                **model(images, texts, third_embeddings=third))
            loss.backward()
            grads = {}
            for name, p in model.named_parameters():  # DDP's gradient: the mean over ranks
                torch.distributed.all_reduce(p.grad)
                grads[name] = (p.grad / world_size).numpy()  # by value: a shared tensor dies with this process
            queue.put((impl, rank, loss.item(), grads if rank == 0 else None))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_siglip_3t_equals_one_process_for_every_dist_impl():
    """For each --loss-dist-impl: the mean of the per-rank SigLIP-3T losses is the single-process loss on the
    concatenated batch, and so is DDP's gradient on every parameter (f, g, heads, temperatures, biases)."""
    world_size = 2
    results = run_two_ranks(_siglip_rank_worker, results_per_rank=len(DIST_IMPLS), timeout=300)

    model = siglip_model()
    images, texts, third = siglip_batch(world_size * B)
    single = ThreeTowersSigLipLoss()(**model(images, texts, third_embeddings=third))
    single.backward()
    expected = {name: p.grad for name, p in model.named_parameters()}
    assert {"visual.conv1.weight", "text.token_embedding.weight", "logit_bias_text_third"} <= set(expected)
    assert all(g.abs().sum() > 0 for g in expected.values())
    for impl in DIST_IMPLS:
        losses = [loss for i, _, loss, _ in results if i == impl]
        assert len(losses) == world_size
        assert sum(losses) / world_size == pytest.approx(single.item(), rel=1e-10), impl
        grads = next(g for i, rank, _, g in results if i == impl and rank == 0)
        assert grads.keys() == expected.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(torch.from_numpy(grad), expected[name], rtol=1e-8, atol=1e-12,
                                       msg=f"{impl}: {name}")


def test_openclip_create_loss_returns_the_3t_loss_for_3t_models():
    from argparse import Namespace

    import open_clip
    args = Namespace(model="3T-tiny", local_loss=True, gather_with_grad=True, rank=1, world_size=4, horovod=False,
                     distill=False, siglip=False, third_tower_loss_weights=[1.0, 0.5, 2.0],
                     third_tower_transfer="l2")
    loss = open_clip.create_loss(args)
    assert isinstance(loss, ThreeTowersLoss)
    assert (loss.weights, loss.transfer, loss.local_loss, loss.rank, loss.world_size) == ((1.0, 0.5, 2.0), "l2", True, 1, 4)
    defaults = open_clip.create_loss(Namespace(**{**vars(args), "third_tower_loss_weights": None,
                                                  "third_tower_transfer": None}))
    assert (defaults.weights, defaults.transfer) == ((1.0, 1.0, 1.0), "contrastive")  # from the 3T-tiny config
    plain = open_clip.create_loss(Namespace(**{**vars(args), "model": "ViT-B-32"}))
    assert type(plain) is ClipLoss


def test_openclip_create_loss_with_siglip_returns_the_sigmoid_3t_loss():
    from argparse import Namespace

    import open_clip
    args = Namespace(model="3T-tiny-sigmoid", siglip=True, loss_dist_impl="shift", rank=1, world_size=4,
                     local_loss=False, gather_with_grad=False, horovod=False, distill=False,
                     third_tower_loss_weights=[1.0, 0.0, 2.0], third_tower_transfer=None)
    loss = open_clip.create_loss(args)
    assert type(loss) is ThreeTowersSigLipLoss and loss.weights == (1.0, 0.0, 2.0)
    assert (loss.siglip.dist_impl, loss.siglip.rank, loss.siglip.world_size) == ("shift", 1, 4)
    plain = open_clip.create_loss(Namespace(**{**vars(args), "model": "ViT-B-16-SigLIP"}))
    assert type(plain) is SigLipLoss and plain.dist_impl == "shift"  # plain models: OpenCLIP's own loss


def test_trainer_imported_first_still_gets_the_3t_loss():
    from tests.conftest import run_python
    # ours keeps OpenCLIP's name and module (functools.wraps), and wraps OpenCLIP's own function
    out = run_python("import open_clip, open_clip_train.main as m, open_clip_3t; "
                     "print(m.create_loss is open_clip.create_loss, open_clip.create_loss.__wrapped__.__module__, "
                     "open_clip.create_loss.__wrapped__ is not open_clip.create_loss)")
    assert out.split() == ["True", "open_clip.factory", "True"]


COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "batch_isend_irecv")


def _k2_rank_worker(rank, world_size, port, gather_with_grad, queue):
    """Every collective call of torch.distributed during the loss's forward and backward is counted (the
    differentiable torch.distributed.nn.all_gather of --gather-with-grad calls torch.distributed.all_gather)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    calls = []

    def counted(module, name):
        real = getattr(module, name)
        return lambda *a, **k: calls.append(f"{module.__name__}.{name}") or real(*a, **k)
    saved = {(torch.distributed, n): getattr(torch.distributed, n) for n in COLLECTIVES}
    try:
        for (module, name) in saved:
            setattr(module, name, counted(module, name))
        x = k2_features(batch=2 * B, seed=14)
        local = {k: (v[rank * B:(rank + 1) * B] if v.ndim == 2 else v).clone().requires_grad_(True)
                 for k, v in x.items()}
        loss = ThreeTowersLoss(gather_with_grad=gather_with_grad, rank=rank, world_size=world_size,
                               towers=TOWERS)(**local)
        forward_calls = list(calls)
        loss.backward()
        queue.put((rank, loss.item(), forward_calls, calls, local["places_text_features"].grad.numpy()))
    finally:
        for (module, name), real in saved.items():
            setattr(module, name, real)
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("gather_with_grad", [False, True])
def test_two_ranks_with_two_towers_equal_one_process_in_one_collective(gather_with_grad):
    """K = 2, two processes: the mean of the per-rank losses is the single-process loss on the concatenated batch,
    and every feature set of both towers (and of f and g) crossed ranks in one all_gather."""
    world_size = 2
    results = sorted(run_two_ranks(_k2_rank_worker, gather_with_grad))
    x = k2_features(batch=2 * B, seed=14, requires_grad=True)
    single = ThreeTowersLoss(towers=TOWERS)(**x)
    single.backward()
    assert sum(r[1] for r in results) / world_size == pytest.approx(single.item(), rel=1e-10)
    gather = "torch.distributed.all_gather"
    for rank, _, forward_calls, all_calls, grad in results:
        assert forward_calls == [gather]  # one collective for the ten feature sets
        if gather_with_grad:  # as for one tower: d(sum of the ranks' losses)/dx_r = world_size x the single gradient
            torch.testing.assert_close(torch.from_numpy(grad), world_size * x["places_text_features"].grad[
                rank * B:(rank + 1) * B], rtol=1e-9, atol=1e-12)
        else:
            assert all_calls == [gather]  # and none in the backward
