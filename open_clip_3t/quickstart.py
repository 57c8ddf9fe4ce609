"""A first look at 3T in under a minute on a CPU: build a tiny 3T model, train a few steps, export a plain CLIP.

    python -m open_clip_3t.quickstart [--out quickstart_out]
"""
import argparse
import time
from pathlib import Path

import open_clip
import timm
import torch

from . import ThreeTowersLoss, export_clip


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m open_clip_3t.quickstart")
    parser.add_argument("--out", default="quickstart_out")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    # A stand-in for a pretrained third tower: saved to a file, loaded through timm's local-file door.
    h_file = out / "third_tower.pth"
    torch.save(timm.create_model("test_vit", num_classes=10, img_size=32).state_dict(), h_file)
    model = open_clip.create_model("3T-tiny", third_tower_weights=str(h_file), output_dict=True)
    tokenizer = open_clip.get_tokenizer("3T-tiny")
    loss_fn = ThreeTowersLoss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    images = torch.randn(16, 3, 32, 32)
    texts = tokenizer([f"image number {i}" for i in range(16)])
    model.train()
    start = time.time()
    for step in range(args.steps):
        losses = loss_fn(**model(images, texts), output_dict=True)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        model.clamp_logit_scales_()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  " + "  ".join(f"{k} {v.item():.4f}" for k, v in losses.items()))
    print(f"{args.steps} steps in {time.time() - start:.1f}s")

    ckpt = out / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, ckpt)
    export = export_clip(ckpt, out / "exported", model_name="3T-tiny", overwrite=True)
    plain = open_clip.create_model(f"local-dir:{export}")
    print(f"exported plain CLIP ({type(plain).__name__}) to {export}")


if __name__ == "__main__":
    main()
