"""Tiny students of the five networks, their weights perturbed (so the s pathway is not zero),
and their outputs on fixed inputs: saved by one code version, checked by another."""
import sys
import torch

def build():
    from plugins.networks import MLP
    from plugins.unet import UNet
    from plugins.edm.songunet import SongUNet
    from plugins.edm.dhariwal import DhariwalUNet
    from plugins.openai.unet import UNetModel
    nets = {
        "mlp": (lambda: MLP(2, width=16, depth=1, emb_dim=8, num_classes=2, student=True),
                lambda g: (torch.randn(3, 2, generator=g), torch.rand(3, generator=g) + 0.5,
                           torch.rand(3, generator=g) * 0.4 + 0.05, torch.tensor([0, 1, 0]))),
        "unet": (lambda: UNet((1, 8, 8), model_channels=8, channel_mult=[1, 2], num_blocks=1,
                              num_classes=2, student=True),
                 lambda g: (torch.randn(2, 1, 8, 8, generator=g), torch.rand(2, generator=g) + 0.5,
                            torch.rand(2, generator=g) * 0.4 + 0.05, torch.tensor([0, 1]))),
        "songunet": (lambda: SongUNet(8, 1, 1, label_dim=0, model_channels=8, channel_mult=[1, 2],
                                      num_blocks=1, attn_resolutions=[4], student=True).eval(),
                     lambda g: (torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, generator=g),
                                None, None, torch.randn(2, generator=g))),
        "dhariwal": (lambda: DhariwalUNet(8, 1, 1, label_dim=0, model_channels=8,
                                          channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                                          student=True).eval(),
                     lambda g: (torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, generator=g),
                                None, None, torch.randn(2, generator=g))),
        "openai": (lambda: UNetModel(8, 1, 32, 1, 1, [2], channel_mult=(1,), num_heads=2,
                                     student=True).eval(),
                   lambda g: (torch.randn(2, 1, 8, 8, generator=g), torch.rand(2, generator=g) * 100,
                              None, torch.rand(2, generator=g) * 50)),
    }
    return nets

def digest(sd):
    import hashlib
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode() + str(sd[k].dtype).encode() + str(list(sd[k].shape)).encode())
        h.update(sd[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

def run(name, net, make_inputs):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        return net(*make_inputs(g))

if __name__ == "__main__":
    out = {}
    for name, (make, inputs) in build().items():
        torch.manual_seed(0)
        net = make()
        fresh = digest(net.state_dict())
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for n, p in net.named_parameters():
                if n.startswith("s_"):                 # the s pathway, no longer zero
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        sd = net.state_dict()
        out[name] = {"fresh": fresh, "keys": list(sd),
                     "s_pathway": {k: v for k, v in sd.items() if k.startswith("s_")},
                     "output": run(name, net, inputs)}
    torch.save(out, sys.argv[1])
