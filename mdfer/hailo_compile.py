"""Compile an mdfer Hailo bundle into a HEF. Runs in the Hailo Dataflow Compiler's own Python
(DFC 3.x, `hailo_sdk_client`), not in mdfer's environment; it imports nothing from mdfer.

    python hailo_compile.py BUNDLE_DIR [--hw-arch hailo8]

BUNDLE_DIR holds hailo_model.tflite (float32, input already normalized), model.alls (the
normalization and optimization settings), calib.npy (NHWC float32 0..255 RGB images) and
heads.json; the HEF is written there as hailo_model.hef.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from hailo_sdk_client import ClientRunner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", default=str(Path(__file__).parent))
    parser.add_argument("--hw-arch", default="hailo8")
    args = parser.parse_args()
    bundle = Path(args.bundle)
    heads = json.loads((bundle / "heads.json").read_text())

    runner = ClientRunner(hw_arch=args.hw_arch)
    runner.translate_tf_model(str(bundle / "hailo_model.tflite"), "mdfer")
    runner.load_model_script(str(bundle / "model.alls"))
    runner.optimize(np.load(bundle / "calib.npy"))
    (bundle / "hailo_model.hef").write_bytes(runner.compile())
    print(f"{bundle / 'hailo_model.hef'}: compiled for {args.hw_arch}; outputs {', '.join(heads['heads'])}")


if __name__ == "__main__":
    main()
