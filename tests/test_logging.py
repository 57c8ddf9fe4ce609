"""Logs that compare: the TensorBoard event file of a tiny 3T run holds each loss term unweighted, under the tag a
CLIP run uses for the same term, and the weighted total as `loss`; a missing logging back-end stops the run before
its folder exists."""
import logging
import re
import sys

import open_clip
import pytest

from open_clip_3t import ThreeTowersLoss
from open_clip_3t.toy.synthetic import write_classification_folder, write_shards
from training.main import main

pytest.importorskip("tensorboard", reason="pip install 'open_clip_3t[tensorboard]'")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

WEIGHTS = (1.0, 0.5, 2.0)  # of L(f,g), L(f_h,h_f), L(g_h,h_g): the logs must undo them
TERMS = ("contrastive_loss", "image_third_loss", "text_third_loss")


def argv(tmp_path, shards, *flags):
    return ["--logs", str(tmp_path / "logs"), "--name", "run", "--device", "cpu", "--precision", "fp32",
            "--workers", "0", "--batch-size", "8", "--train-num-samples", "16", "--epochs", "1", "--seed", "0",
            "--log-every-n-steps", "1", "--train-data", shards, "--model", "3T-tiny", *flags]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("data")), num_samples=16, samples_per_shard=16, seed=0,
                        image_size=32)[0]


def test_tensorboard_holds_each_term_unweighted_and_the_weighted_total(tmp_path, shards, h_weights, monkeypatch):
    calls = []  # what the loss module returned at each step, and the features it saw
    forward = ThreeTowersLoss.forward

    def recording(self, *args, **model_out):
        losses = forward(self, *args, **model_out)
        calls.append(({k: v.item() for k, v in losses.items()},
                      {k: model_out[k].detach().clone() for k in ("image_features", "text_features", "logit_scale")}))
        return losses
    monkeypatch.setattr(ThreeTowersLoss, "forward", recording)
    handlers = list(logging.root.handlers)
    try:
        main(argv(tmp_path, shards, "--third-tower-weights", h_weights, "--report-to", "tensorboard",
                  "--third-tower-loss-weights", *map(str, WEIGHTS), "--zeroshot-frequency", "1", "--zeroshot-data",
                  write_classification_folder(str(tmp_path / "shape"), "shape", 2, seed=0, image_size=32)))
    finally:  # OpenCLIP's setup_logging adds handlers on every call: drop this run's
        for handler in logging.root.handlers[len(handlers):]:
            handler.close()
            logging.root.removeHandler(handler)

    # in-training evaluation shows its progress (not a tty: one line per 10%, into the run's log)
    progress = re.findall(r"Eval shape-zeroshot: +(\d+)% \((\d+)/(\d+) batches\)",
                          (tmp_path / "logs" / "run" / "out.log").read_text())
    assert progress and progress[-1][0] == "100" and progress[-1][1] == progress[-1][2]
    events = EventAccumulator(str(tmp_path / "logs" / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"train/{t}" for t in (*TERMS, "loss", "scale", "scale_image_third", "scale_text_third")} <= tags
    assert len(calls) == 2  # 16 samples, batches of 8: two steps, each logged
    clip_loss = open_clip.ClipLoss()
    for name, weight in zip(TERMS, WEIGHTS):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{name}")]
        assert logged == [(step, pytest.approx(terms[name] * 3 / weight, rel=1e-6))
                          for step, (terms, _) in enumerate(calls)], name
    for (step, value), (terms, out) in zip([(e.step, e.value) for e in events.Scalars("train/loss")], calls):
        assert value == pytest.approx(sum(terms.values()), rel=1e-6)  # the loss the step minimised
        clip = clip_loss(out["image_features"], out["text_features"], out["logit_scale"]).item()
        contrastive = events.Scalars("train/contrastive_loss")[step].value
        assert contrastive == pytest.approx(clip, rel=1e-5)  # what a CLIP run logs under the same tag


@pytest.mark.parametrize("backend, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_logging_backend_stops_the_run_before_its_folder(backend, module, tmp_path, shards, h_weights,
                                                                   monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as when it is not installed
    with pytest.raises(SystemExit) as e:
        main(argv(tmp_path, shards, "--third-tower-weights", h_weights, "--report-to", backend))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"training.main: error: --report-to {backend}") and err[0].endswith(
        f": pip install 'open_clip_3t[{backend}]' (or pip install {backend}), or drop {backend} from --report-to")
    assert not (tmp_path / "logs").exists()
