"""One small fused-block training step on a chosen backend, for compute-sanitizer (memcheck / racecheck).

Also one training step and one eval forward of a small Packed ResNet-18 (cifar stem): in training its blocks run
as a chain, so the junction kernels (a block's tail backward in the next conv's dgrad) are checked too. And the
PE-(2,4,1) ResNet-18 itself on a tiny input: its 32-channel groups run two groups a program (PACK: the eval forward,
the dgrad) and its 3x3 training forwards with a prologue store x' for their wgrad (STORE_XP, 2-byte dtypes).

    compute-sanitizer --tool memcheck python tools/sanitize_step.py --backend cuda
"""

import argparse

import torch

import pe_kernels
from pe_kernels.models import packed_resnet
from pe_kernels.nn import PackedBottleneck


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cuda", choices=pe_kernels._backend.backend_names() + ("auto",))
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    block = PackedBottleneck(32, 16, 2, alpha=2, num_estimators=4, gamma=2, conv_bias=False, dropout_rate=0,
                             groups=1).cuda().to(memory_format=torch.channels_last)
    model = packed_resnet(3, 10, 18, num_estimators=2, alpha=2, gamma=1, style="cifar",
                          width_multiplier=0.25).cuda().to(memory_format=torch.channels_last)
    pe_2_4_1 = packed_resnet(3, 10, 18, num_estimators=4, alpha=2, gamma=1, style="cifar").cuda().to(
        memory_format=torch.channels_last)
    for module, shape in ((block, (4, 64, 9, 9)), (model, (4, 3, 12, 12)), (pe_2_4_1, (4, 3, 10, 10))):
        x = torch.randn(shape, device="cuda").to(memory_format=torch.channels_last)
        with pe_kernels.use_backend(args.backend), torch.autocast("cuda", dtype=dtype,
                                                                  enabled=dtype != torch.float32):
            module.train()
            module(x).float().square().mean().backward()
            module.eval()
            with torch.no_grad():
                module(x)
    torch.cuda.synchronize()
    print(f"sanitize step done: backend={args.backend} dtype={args.dtype} last={pe_kernels.last_dispatch()}")


if __name__ == "__main__":
    main()
