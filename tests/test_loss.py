import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip import ClipLoss

import open_clip_3t.loss as loss_module
from open_clip_3t import ThreeTowersLoss

B, D, DH = 5, 4, 3
NAMES = ("image_features", "text_features", "image_third_features", "third_image_features",
         "text_third_features", "third_text_features")


def features(batch=B, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    dims = (D, D, DH, DH, DH, DH)
    out = {n: F.normalize(torch.randn(batch, d, generator=g, dtype=torch.float64), dim=-1) for n, d in zip(NAMES, dims)}
    out.update(logit_scale=torch.tensor(10.0, dtype=torch.float64),
               logit_scale_image_third=torch.tensor(7.0, dtype=torch.float64),
               logit_scale_text_third=torch.tensor(3.0, dtype=torch.float64))
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
    with pytest.raises(ValueError, match="three loss weights"):
        ThreeTowersLoss(weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="transfer='mse'"):
        ThreeTowersLoss(transfer="mse")


# --- two processes, gloo -----------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_worker, args=(r, world_size, port, local_loss, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

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


def test_openclip_create_loss_returns_the_3t_loss_for_3t_models():
    from argparse import Namespace

    import open_clip
    args = Namespace(model="3T-tiny", local_loss=True, gather_with_grad=True, rank=1, world_size=4, horovod=False,
                     distill=False, siglip=False, three_towers_loss_weights=[1.0, 0.5, 2.0],
                     three_towers_transfer="l2")
    loss = open_clip.create_loss(args)
    assert isinstance(loss, ThreeTowersLoss)
    assert (loss.weights, loss.transfer, loss.local_loss, loss.rank, loss.world_size) == ((1.0, 0.5, 2.0), "l2", True, 1, 4)
    defaults = open_clip.create_loss(Namespace(**{**vars(args), "three_towers_loss_weights": None,
                                                  "three_towers_transfer": None}))
    assert (defaults.weights, defaults.transfer) == ((1.0, 1.0, 1.0), "contrastive")  # from the 3T-tiny config
    plain = open_clip.create_loss(Namespace(**{**vars(args), "model": "ViT-B-32"}))
    assert type(plain) is ClipLoss


def test_trainer_imported_first_still_gets_the_3t_loss():
    from tests.conftest import run_python
    out = run_python("import open_clip, open_clip_train.main as m, open_clip_3t; "
                     "print(m.create_loss is open_clip.create_loss, open_clip.create_loss.__module__)")
    assert out.split() == ["True", "open_clip_3t._openclip"]
