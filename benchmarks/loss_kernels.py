"""The loss alone: DynSDPB's fused loss against TRL's fused SFT loss on the same response tokens, forward + backward.

    python benchmarks/loss_kernels.py                 # Llama-2-7B's head: hidden 4096, vocabulary 32,000
    python benchmarks/loss_kernels.py --tokens 512 --hidden 256 --repeats 3     # a quick look on a CPU

Where `gpu_qlora.py` times whole training steps (of which the loss is a few percent for a 7B model, and whose noise
is larger than the loss), this isolates what DynSDPB adds: the same hidden states and frozen output layer, half the
tokens distilled towards a teacher given as hidden states (the LoRA/QLoRA case), in bf16. TRL's `SFTTrainer` loss
(`trl.kernels.ChunkedLogProbFunction`, Triton on GPUs) is the baseline, timed in the same run, for each token chunk
size of the DynSDPB loss. The floor: the output-layer products each loss must compute (TRL: forward, recomputed
forward and input gradient for every token; DynSDPB: the same plus the teacher's projection, forward and backward, for
the distilled tokens) at the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from harness import device_name, synchronize
from trl.kernels import ChunkedLogProbFunction

from trl_selfdistill.dynsdpb.losses import fused_distillation_loss


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=3576, help="response tokens (8 rows x 447)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[None], help="tokens per chunk (None: default)")
    return parser.parse_args()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (kernels, autotuning, allocator)
    seconds = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    cli = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    torch.manual_seed(0)
    hidden = (torch.randn(cli.tokens, cli.hidden, device=device) / 4).to(dtype).requires_grad_()
    weight = (torch.randn(cli.vocab, cli.hidden, device=device) / cli.hidden**0.5).to(dtype)  # frozen
    targets = torch.randint(0, cli.vocab, (cli.tokens,), device=device)
    distilled = cli.tokens // 2
    teacher = (hidden.detach()[:distilled] + 0.1 * torch.randn_like(hidden[:distilled])).to(dtype)
    kl_weight = torch.rand(distilled, device=device)
    temperature = 3 + torch.rand(distilled, device=device)

    def sft():
        log_probs = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, ("entropy",))[0]
        (-log_probs.sum()).backward()
        hidden.grad = None

    def dynsdpb(chunk_size):
        log_probs, distill, *_ = fused_distillation_loss(
            hidden, weight, None, targets, teacher, True, kl_weight, temperature, chunk_size
        )
        (distill.sum() - log_probs.sum()).backward()
        hidden.grad = None

    sft_seconds = timed(sft, cli.repeats)
    print(f"loss forward + backward on {device_name()}: {cli.tokens} tokens ({distilled} distilled), hidden "
          f"{cli.hidden}, vocabulary {cli.vocab}, bf16, median of {cli.repeats}")  # fmt: skip
    product = 2 * cli.hidden * cli.vocab  # FLOPs of one token's projection
    peak = next((v for k, v in {"H100": 989e12, "H200": 989e12}.items() if k in device_name()), None)
    floors = (3 * cli.tokens * product, (3 * cli.tokens + 2 * distilled) * product)
    print("| loss | tokens per chunk | time | matmul floor at bf16 peak |\n|---|---|---|---|")
    floor = f"{floors[0] / peak * 1e3:.2f} ms" if peak else "n/a"
    print(f"| TRL SFT (fused LM head) | 4096 | {sft_seconds * 1e3:.2f} ms | {floor} |")
    ratios = []
    for chunk_size in cli.chunk_sizes:
        seconds = timed(lambda chunk_size=chunk_size: dynsdpb(chunk_size), cli.repeats)
        ratios.append(f"{chunk_size or 'default'}: {seconds / sft_seconds:.2f}x")
        floor = f"{floors[1] / peak * 1e3:.2f} ms" if peak else "n/a"
        print(f"| DynSDPB (hidden-state teacher) | {chunk_size or 'default'} | {seconds * 1e3:.2f} ms | {floor} |")
    print("ratio to TRL's SFT loss, DynSDPB by tokens per chunk: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
