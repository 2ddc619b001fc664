"""Are attention gradients finite for left-padded batches of every width? (GPU check)

    python -m bench.bench_attention_grads [--widths 128,191,192,193,256,320] [--params params.yaml]

Fine-tuning batches are left-padded, so some query rows attend to nothing. cuDNN's
fused-attention backward (PyTorch's first SDPA choice on H100 from torch 2.11) returns
NaN query gradients for such batches when the width is 64 mod 128 (pytorch/pytorch#196678);
`finetune` therefore turns that kernel off on CUDA. This runs the backbone of
data/backbone (bf16 on CUDA, fp32 on CPU) forward and backward on one left-padded batch
per width, with each SDPA kernel choice the machine has, and reports how many gradient
tensors are non-finite. Expect zeros everywhere except, on an affected GPU, the cuDNN
rows at widths 64 mod 128. Not a test.
"""

from __future__ import annotations

import argparse
import json

import torch

from ttds_core.backbone import decoder_of, load_backbone
from ttds_core.config import load_params


def nonfinite_grads(model, width: int, device) -> int:
    """Non-finite gradient tensors after one forward/backward on a left-padded batch whose
    rows have `width`, `width` - 37 and 5 real tokens."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(width)
    ids = torch.randint(0, vocab, (3, width), generator=gen).to(device)
    mask = torch.zeros(3, width, dtype=torch.long, device=device)
    for row, real in enumerate((width, width - 37, 5)):
        mask[row, width - real:] = 1
    model.zero_grad(set_to_none=True)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = decoder_of(model)(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
    # a loss on real positions only, as training's: padding rows get no gradient from it
    loss = (hidden.float().pow(2).mean(-1) * mask).sum() / mask.sum()
    loss.backward()
    return sum(int(not torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--widths", default="128,191,192,193,256,320")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_backbone(load_params(args.params), device=device,
                             dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.train()
    kernels = {"default": None}
    if device.type == "cuda":
        kernels = {"cudnn on (torch default)": True, "cudnn off (finetune's setting)": False}
    rows = []
    for name, cudnn in kernels.items():
        if cudnn is not None:
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
        for width in (int(w) for w in args.widths.split(",")):
            rows.append({"device": device.type, "kernels": name, "width": width,
                         "nonfinite_grad_tensors": nonfinite_grads(model, width, device)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
