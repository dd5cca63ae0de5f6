"""`klgrade export`: a run's model as ONNX or TorchScript, parity-checked.

    klgrade export --run runs/resnet18 --format onnx --out resnet18.onnx

The file maps the normalised image tensor ``image`` float32 (batch, 3, S, S) to ``probabilities``
float32 (batch, 5). Input: the S x S uint8 knee view / 255, gray replicated to 3 channels,
normalised with the run's mean/std; S, mean and std are printed and written to ``OUT.json``.
Before the file is published it is reloaded (onnxruntime / torch.jit.load) and its probabilities
must match PyTorch's to within 1e-4 (max absolute difference), else nothing is written.
"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("export", help="export a run's model to ONNX or TorchScript (parity-checked)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run dir (CNN run, or an mlp/linear head run)")
    p.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    p.add_argument("--out", required=True, help="output file (e.g. model.onnx, model.pt); OUT.json is written too")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.set_defaults(func=run)


def run(args) -> int:
    from klgrade.clinic.export import ExportError, export_run, sidecar_path
    from klgrade.errors import UserError

    try:
        info = export_run(args.run, args.format, args.out, opset=args.opset)
    except ExportError as e:
        raise UserError(str(e)) from e
    inp, par = info["input"], info["parity"]
    print(f"wrote {args.out} ({info['format']}, {info['model']})")
    print(f"  input  '{inp['name']}' float32 {inp['shape']} NCHW: view/255 as 3 channels, "
          f"(x - mean) / std with mean {[round(m, 4) for m in inp['mean']]}, std {[round(s, 4) for s in inp['std']]}")
    print(f"  output '{info['output']['name']}' float32 {info['output']['shape']}: P(KL 0..4)")
    print(f"  parity: max |p_export - p_torch| = {par['max_abs_diff']:.2e} < {par['tolerance']:g} "
          f"({par['checked_with']}, {par['inputs']} inputs)")
    print(f"  details: {sidecar_path(args.out)}")
    return 0
