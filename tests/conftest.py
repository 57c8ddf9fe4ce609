"""Shared fixtures: a locally saved "pretrained" third tower and a tiny Hugging Face text tower (no downloads)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import open_clip_3t  # noqa: F401  (registers the 3T configs)

torch.set_num_threads(min(2, os.cpu_count() or 1))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def h_weights(tmp_path_factory):
    """A test_vit classifier saved to a file, loaded as h through timm's local-file door."""
    torch.manual_seed(123)
    h = timm.create_model("test_vit", num_classes=7, img_size=32)
    path = tmp_path_factory.mktemp("third_tower") / "test_vit_32.pth"
    torch.save(h.state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def hf_three_towers(tmp_path_factory):
    """`local-dir:FOLDER` of a tiny 3T model whose text tower g is a Hugging Face RoBERTa written here (config,
    byte-level BPE tokenizer, random weights in a folder of its own): the hub is never asked. FOLDER holds the 3T
    config and the tokenizer's files (OpenCLIP reads a local-dir model's HF tokenizer from the folder itself)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("hf_three_towers")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["a photo of two red circles on the left", "three blue squares", "a green star"],
                            trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = transformers.RobertaTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                                  pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    hf_dir, model_dir = root / "tiny-roberta", root / "3T-tiny-roberta"
    config = transformers.RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=40,
                                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    transformers.RobertaModel(config, add_pooling_layer=False).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    tokenizer.save_pretrained(model_dir)

    tiny = json.loads((Path(open_clip_3t.__file__).parent / "model_configs" / "3T-tiny.json").read_text())
    text_cfg = {"hf_model_name": str(hf_dir), "hf_tokenizer_name": str(hf_dir), "hf_pooler_type": "mean_pooler",
                "hf_proj_type": "mlp", "context_length": 16}
    model_cfg = {"embed_dim": tiny["embed_dim"], "vision_cfg": tiny["vision_cfg"], "text_cfg": text_cfg,
                 "three_towers": tiny["three_towers"]}
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    return f"local-dir:{model_dir}"


def run_python(code, env=None, timeout=300):
    """Run `code` in a fresh interpreter (one that never imported open_clip_3t); returns stdout."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# Session-wide local SLURM cluster (scripts/slurm/local_cluster.sh); see tests/slurm_cluster.py.
from tests.slurm_cluster import slurm_cluster  # noqa: E402,F401
