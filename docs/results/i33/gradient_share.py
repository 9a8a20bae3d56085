"""How much each MixCL term pulls on the encoder: the gradient norm of each weighted term
(identity, alpha * label, beta * recon) on the encoder's weights, at initialisation and after
pre-training, averaged over the batches of steps 1-3 (issue 33, cause-finding).

    OMP_NUM_THREADS=1 python docs/results/i33/gradient_share.py runs/i33/pretrain/mixcl-unet \
        data/phantom-pool
"""

import json
import sys
from pathlib import Path

import torch

from medssl_kit.data.manifest import load_manifest
from medssl_kit.methods.registry import get_method
from medssl_kit.models.registry import build_backbone
from medssl_kit.train.pretrain import PretrainConfig, build_dataset, draw_batch, load_method


def term_gradients(method, dataset, cfg) -> dict[str, tuple[float, float]]:
    """``{term: (mean value, mean gradient norm of the weighted term on the encoder)}``."""
    params = list(method.backbone.encoder.parameters())
    weights = {"identity": 1.0, "label": method.cfg["alpha"], "recon": method.cfg["beta"]}
    sums: dict[str, list[float]] = {}
    for step in (1, 2, 3):
        terms = method(draw_batch(method, dataset, cfg, step), step)
        for term, w in weights.items():
            loss = w * terms[term]
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            norm = torch.sqrt(sum((g**2).sum() for g in grads if g is not None)).item()
            value, total = sums.setdefault(term, [0.0, 0.0])
            sums[term] = [value + terms[term].item() / 3, total + norm / 3]
    return {k: (v[0], v[1]) for k, v in sums.items()}


def main(run: str, manifest: str) -> None:
    config = json.loads(Path(run, "config.json").read_text())
    known = PretrainConfig.__dataclass_fields__
    cfg = PretrainConfig(**{k: v for k, v in config["config"].items() if k in known})
    cfg.crop_size, cfg.patch_size = tuple(cfg.crop_size), tuple(cfg.patch_size)
    dataset = build_dataset(get_method("mixcl"), load_manifest(manifest), cfg)
    torch.manual_seed(cfg.seed)
    sizes = {"crop_size": cfg.crop_size, "patch_size": cfg.patch_size}
    initial = get_method("mixcl")(build_backbone(**config["backbone"]), {**cfg.method_cfg, **sizes})
    print(f"{run}: alpha {cfg.method_cfg['alpha']}, beta {cfg.method_cfg['beta']}")
    for name, method in (("initial", initial), (f"after {cfg.steps} steps", load_method(run))):
        print(name)
        for term, (value, norm) in term_gradients(method.train(), dataset, cfg).items():
            print(f"  {term}: value {value:.4f}, gradient norm of the weighted term {norm:.4g}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
