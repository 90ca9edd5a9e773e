"""Check that Cellpose 3 itself loads weights written by ``zseg train`` from a Cellpose 3 model.

Run it in a separate environment that has Cellpose 3 (zseg does not depend on it), as
``scripts/make_cp3_fixture.py`` is run::

    /tmp/cp3/bin/python scripts/check_cp3_load.py tuned.pt

It builds Cellpose 3.1.1.3's ``CPnet`` of the file's sizes, loads the file with Cellpose 3's own
``CPnet.load_model``, checks that the network holds exactly the file's tensors, runs it on a
random image, and prints one JSON line (exit code 1 when a tensor differs).
"""

from __future__ import annotations

import json
import sys

import cellpose
import torch
from cellpose import resnet_torch


def main(path: str) -> dict:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    levels = sorted({int(k.split(".")[2].rsplit("_", 1)[1]) for k in sd if k.startswith("downsample.down.res_down_")})
    first = sd["downsample.down.res_down_0.conv.conv_0.2.weight"]
    nbase = [int(first.shape[1])] + [int(sd[f"downsample.down.res_down_{i}.conv.conv_0.2.weight"].shape[0])
                                     for i in levels]
    net = resnet_torch.CPnet(nbase, 3, sz=3, mkldnn=False, max_pool=True, diam_mean=float(sd["diam_mean"]))
    net.load_model(path, device=torch.device("cpu"))  # Cellpose 3's own loader
    theirs = net.state_dict()
    same = set(theirs) == set(sd) and all(torch.equal(theirs[k].float(), v.float()) for k, v in sd.items())
    with torch.no_grad():
        y = net.eval()(torch.rand(1, nbase[0], 64, 64))[0]
    out = {"cellpose": cellpose.version, "file": path, "nbase": nbase, "tensors": len(sd), "identical": bool(same),
           "diam_labels": float(net.diam_labels), "output_shape": list(y.shape)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    r = main(sys.argv[1])
    sys.exit(0 if r["identical"] else 1)
