"""Release: the export's model card and provenance record, publishing with huggingface_hub's API (the network call
replaced, the upload plan checked), and loading the published folder through hf-hub: from an offline cache in a
process that never imports open_clip_3t."""
import hashlib
import json
import re
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from huggingface_hub import CommitOperationAdd, HfApi

from open_clip_3t import export_clip
from open_clip_3t.publish import PublishError, publish
from open_clip_3t.plan import resolve_plan
from open_clip_3t.release import PLACEHOLDER, provenance
from tests.conftest import run_python
from tests.test_export import trained_checkpoint
from tests.test_hostile import write_hub_cache

REPO_ID = "my-lab/3t-tiny-shapes"
RELEASED = ["README.md", "open_clip_3t_provenance.json", "open_clip_config.json", "open_clip_model.safetensors"]


def sha256(path):
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def released(tmp_path_factory, h_weights):
    """A tiny 3T run folder as training.main leaves it (params.txt, out.log of two ranks, results.jsonl, a
    training.eval results.csv), and its export."""
    tmp_path = tmp_path_factory.mktemp("release")
    model, ckpt = trained_checkpoint(tmp_path, h_weights)
    run = ckpt.parent.parent
    (run / "params.txt").write_text(
        f"batch_size: 8\nepochs: 2\nlr: 0.001\nmodel: 3T-tiny\nname: shapes-3t\nprecision: fp32\nseed: 0\n"
        f"third_tower_loss_weights: None\nthird_tower_weights: ['{h_weights}']\n"
        f"train_data: /data/shapes/{{00000..00003}}.tar\ntrain_num_samples: 64\nworld_size: 2\n")
    (run / "out.log").write_text("".join(f"... | INFO | Train Epoch: 0 done on rank {r}: 4 steps, {n} samples\n"
                                         for r, n in ((0, 32), (1, 32), (0, 16))))  # rank 0 requeued: the last wins
    (ckpt.parent / "results.jsonl").write_text(json.dumps({"shape-zeroshot-top1": 0.625, "epoch": 1}) + "\n")
    (run / "eval").mkdir()
    (run / "eval" / "results.csv").write_text("model,task,acc1\nepoch_1.pt,shape,0.75\n")
    return model, ckpt, export_clip(ckpt, tmp_path / "released")


def test_the_export_carries_a_model_card_and_its_provenance(released, h_weights):
    model, ckpt, out = released
    assert sorted(p.name for p in out.iterdir()) == RELEASED
    record = json.loads((out / "open_clip_3t_provenance.json").read_text())
    assert record["checkpoint"] == {"path": str(ckpt.resolve()), "sha256": sha256(ckpt), "bytes": ckpt.stat().st_size}
    assert (record["model"], record["exported_class"], record["run"]["name"]) == ("3T-tiny", "CLIP", "shapes-3t")
    assert record["third_towers"] == [{"name": "third", "timm_model": "test_vit", "weights": h_weights,
                                       "weights_sha256": sha256(Path(h_weights))}]
    assert record["training"]["epochs_completed"] == 1 and record["training"]["epochs_planned"] == 2
    assert (record["training"]["samples_seen"], record["training"]["samples_seen_from"]) == (
        16 + 32, "out.log (every rank's epoch ends)")
    assert record["data"]["train_data"] == "/data/shapes/{00000..00003}.tar"
    assert record["loss"] == {"siglip": False, "weights": [1.0, 1.0, 1.0], "transfer": "contrastive"}
    assert record["evaluations"] == [
        {"source": "checkpoints/results.jsonl", "metrics": {"shape-zeroshot-top1": 0.625, "epoch": 1}},
        {"source": "eval/results.csv", "metrics": {"model": "epoch_1.pt", "task": "shape", "acc1": "0.75"}}]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: open_clip\n") and "\n---\n\n# NAME\n" in card
    assert f"open_clip.create_model_and_transforms('hf-hub:{PLACEHOLDER}')" in card
    for row in ("| samples seen | 48 |", "| epochs completed (of planned) | 1 (of 2) |",
                "| shape-zeroshot-top1 | 0.6250 |",
                "| acc1 | 0.7500 |", f"| source checkpoint | epoch_1.pt ({sha256(ckpt)}) |",
                "| training data | /data/shapes/{00000..00003}.tar |", "| batch size x ranks | 8 x 2 |"):
        assert row in card, row


def test_a_step_checkpoints_provenance_counts_the_batches_of_its_unfinished_epoch(released):
    """epoch_1_step_3.pt (training/long_run.py): one epoch done (48 samples by out.log) + 3 batches x 8 x 2 ranks."""
    _, ckpt, _ = released
    step = ckpt.parent / "epoch_1_step_3.pt"
    held = torch.load(ckpt, map_location="cpu", weights_only=True)
    torch.save({**held, "epoch": 1, "resume": {"epoch": 1, "batches": 3}}, step)
    try:
        record = provenance(step, "3T-tiny", resolve_plan("3T-tiny", build_by_default=False), "CLIP")
    finally:
        step.unlink()
    assert (record["training"]["epochs_completed"], record["training"]["batches_into_next_epoch"]) == (1, 3)
    assert (record["training"]["samples_seen"], record["training"]["samples_seen_from"]) == (
        48 + 3 * 8 * 2, "out.log (every rank's epoch ends) + the step checkpoint's 3 batches x 8 x 2 ranks")


class Recorded(HfApi):
    """huggingface_hub's HfApi with its network calls replaced (create the repo, check the card's metadata, commit):
    what would have been sent is recorded; the card's metadata is checked here as the hub would (YAML, a mapping)."""
    calls = []

    def _validate_yaml(self, content, **kwargs):
        front = yaml.safe_load(content.split("---\n")[1])
        assert isinstance(front, dict) and front["library_name"] == "open_clip"

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, operations, kwargs))
        return "commit-info"


def test_publish_uploads_exactly_the_export_with_huggingface_hubs_api(released, tmp_path, monkeypatch):
    _, _, out = released
    folder = tmp_path / "to_publish"
    folder.mkdir()
    for p in out.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "notes.txt").write_text("mine, not the model's")  # never uploaded
    # upload_folder's single-commit path (hf_xet's pipeline, when installed, makes its own network calls)
    monkeypatch.setattr("huggingface_hub.hf_api.is_xet_available", lambda: False)
    api = Recorded(endpoint="http://127.0.0.1:9", token="hf_not_a_token")
    assert publish(folder, REPO_ID, api=api) == "commit-info"
    (_, repo, kwargs), (_, repo2, operations, commit) = api.calls
    assert (repo, repo2, kwargs) == (REPO_ID, REPO_ID, {"repo_type": "model", "private": False, "exist_ok": True})
    assert all(type(op) is CommitOperationAdd for op in operations) and commit["commit_message"] == \
        "3t-tiny-shapes: open_clip_3t export"
    sent = {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}
    assert sorted(sent) == RELEASED and all(sent[name] == (folder / name).read_bytes() for name in sent)
    assert f"create_model_and_transforms('hf-hub:{REPO_ID}')" in sent["README.md"].decode()
    assert "\n# 3t-tiny-shapes\n" in sent["README.md"].decode()
    assert json.loads(sent["open_clip_3t_provenance.json"])["hub_id"] == REPO_ID

    for repo_id, folder_, message in (("no-org", folder, "give the hub repository as ORG/NAME"),
                                      ("a/../b", folder, "give the hub repository as ORG/NAME"),
                                      (REPO_ID, tmp_path, "is not an export (no open_clip_config.json)")):
        with pytest.raises(PublishError, match=re.escape(message)):
            publish(folder_, repo_id, api=api)
    assert len(api.calls) == 2  # nothing sent


def test_publish_and_push_to_hub_fail_in_one_line(released, tmp_path, capsys):
    from open_clip_3t.export import main as export_main
    from open_clip_3t.publish import main as publish_main
    _, ckpt, out = released
    with pytest.raises(SystemExit) as e:  # a bad id is refused before the export is written
        export_main([str(ckpt), "--out", str(tmp_path / "x"), "--push-to-hub", "just-a-name"])
    assert str(e.value).startswith("error: --push-to-hub 'just-a-name': give the hub repository as ORG/NAME")
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as e:  # offline: huggingface_hub refuses to connect
        with pytest.MonkeyPatch.context() as m:
            m.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
            publish_main([str(out), REPO_ID])
    assert str(e.value).startswith(f"python -m open_clip_3t.publish: error: uploading {out} to {REPO_ID} failed (")
    assert "\n" not in str(e.value)


HUB_LOAD = """
import sys, torch, open_clip
m, _, val = open_clip.create_model_and_transforms('hf-hub:{repo}')
m.eval()
x = torch.load('{inputs}')
with torch.no_grad():
    torch.save({{'image': m.encode_image(x['images'], normalize=True),
                'text': m.encode_text(open_clip.get_tokenizer('hf-hub:{repo}')(x['captions']), normalize=True),
                'scale': m.logit_scale, 'plugin': 'open_clip_3t' in sys.modules}}, '{result}')
"""


def test_the_published_model_loads_through_hf_hub_offline_without_the_plugin(released, tmp_path):
    model, _, out = released
    hf_home = tmp_path / "hf"
    write_hub_cache(hf_home, REPO_ID, out)  # the hub's cache layout, as a download of the published repo leaves it
    images, captions = torch.randn(2, 3, 32, 32), ["a red circle", "two blue squares"]
    torch.save({"images": images, "captions": captions}, tmp_path / "inputs.pt")
    run_python(HUB_LOAD.format(repo=REPO_ID, inputs=tmp_path / "inputs.pt", result=tmp_path / "hub.pt"),
               env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    hub = torch.load(tmp_path / "hub.pt")
    assert hub["plugin"] is False
    with torch.no_grad():
        torch.testing.assert_close(hub["image"], model.encode_image(images, normalize=True))
        torch.testing.assert_close(hub["text"], model.encode_text(open_clip.get_tokenizer("3T-tiny")(captions),
                                                                  normalize=True))
    assert torch.equal(hub["scale"], model.logit_scale.detach())
    assert sys.modules.get("open_clip_3t") is not None  # this process did import it: the subprocess did not
