"""The transformers 5.24 media processors of Qwen3-Omni, built offline from the released values.

Test-only: media.py must reproduce these without importing transformers or torchvision.

transformers' image and video processors need torchvision (without it `Qwen2VLImageProcessor`
silently falls back to the PIL backend, which resizes differently). On the CPU-only torch of this
project the PyPI torchvision wheel imports but cannot register its C++ ops ("operator
torchvision::nms does not exist"); only its pure-torch transforms are used, so in that one case the
two op-registration modules are replaced by empty stubs (the recipe of shared/omni_tiny_hf.py).
torchvision lives outside the venv's site-packages, so the project's runtime never sees it:

    .venv/bin/pip install --no-deps --target .venv/torchvision-ref torchvision==0.28.0

(0.28.0 is the torchvision built against torch 2.13.0.) `.ci/run` does exactly that.

transformers decides once, when it is first imported, whether torchvision is available; in a full
pytest run other test files import it earlier. So `reference(requests)` computes everything in a
fresh interpreter (`python tests/hf_processors.py IN OUT`) that imports torchvision first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

TORCHVISION_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               ".venv", "torchvision-ref")

# the released preprocessor_config.json's feature extractor. It has n_samples 4800000 but no chunk_length,
# so WhisperFeatureExtractor keeps chunk_length=30 and recomputes n_samples=480000 (harmless: no truncation).
FE_KW = dict(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400, n_samples=4800000,
             nb_max_frames=30000, padding_value=0.0, padding_side="right", return_attention_mask=True, dither=0.0)
IMG_KW = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
              image_std=[0.5, 0.5, 0.5], min_pixels=3136, max_pixels=12845056)


def import_torchvision():
    """Import torchvision from TORCHVISION_DIR, stubbing its op registrations only on the known error."""
    if TORCHVISION_DIR not in sys.path:
        sys.path.insert(0, TORCHVISION_DIR)
    try:
        import torchvision
    except RuntimeError as e:  # CPU torch + the PyPI wheel: C++ ops missing, transforms still fine
        if "torchvision::nms" not in str(e):
            raise
        for m in [k for k in list(sys.modules) if k.startswith("torchvision")]:
            del sys.modules[m]
        for m in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules[m] = types.ModuleType(m)
        import torchvision
    return torchvision


def compute(req: dict) -> dict:
    """Run the HF processors on the requested inputs. Must run before anything imports transformers."""
    if "transformers" in sys.modules:
        raise RuntimeError("compute() must run in a fresh interpreter: transformers is already imported")
    try:
        import_torchvision()
    except ImportError as e:
        raise ImportError(f"torchvision not found in {TORCHVISION_DIR}; install it with: .venv/bin/pip install "
                          f"--no-deps --target .venv/torchvision-ref torchvision==0.28.0") from e
    import numpy as np
    import torch
    from PIL import Image, ImageOps
    from transformers import (Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3OmniMoeProcessor,
                              WhisperFeatureExtractor)
    from transformers.audio_utils import mel_filter_bank
    from transformers.image_processing_backends import TorchvisionBackend
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import _get_feat_extract_output_lengths

    fe = WhisperFeatureExtractor(**FE_KW)
    ip = Qwen2VLImageProcessor(**IMG_KW)
    vp = Qwen2VLVideoProcessor(**IMG_KW)
    assert isinstance(ip, TorchvisionBackend), type(ip)  # not the PIL fallback
    out = {"mel_bank": mel_filter_bank(num_frequency_bins=201, num_mel_filters=128, min_frequency=0.0,
                                       max_frequency=8000.0, sampling_rate=16000, norm="slaney", mel_scale="slaney")}

    # audio: one clip per call, with the processor's audio_kwargs
    out["audio"] = []
    for wave in req.get("audio", []):
        r = fe(wave, return_tensors="pt", **Qwen3OmniMoeProcessor.audio_kwargs)
        out["audio"].append((r["input_features"][0], int(r["attention_mask"].sum())))
    # a row's clips in one call, as ms-swift calls the processor: each clip's valid features, frames and tokens
    out["audio_rows"] = []
    for row in req.get("audio_rows", []):
        r = fe(row, return_tensors="pt", **Qwen3OmniMoeProcessor.audio_kwargs)
        frames = r["attention_mask"].sum(-1)
        tokens = _get_feat_extract_output_lengths(frames, 50)
        out["audio_rows"].append([(r["input_features"][i, :, :int(n)], int(n), int(t))
                                  for i, (n, t) in enumerate(zip(frames, tokens))])
    out["audio_tokens"] = _get_feat_extract_output_lengths(np.asarray(req.get("audio_token_frames", [])), 50)

    def image(x):
        r = ip(x, return_tensors="pt")
        return r["pixel_values"], tuple(r["image_grid_thw"][0].tolist())

    out["images"] = [image(x) for x in req.get("images", [])]
    # files: opened and EXIF-rotated as transformers' load_image does, but handed to the processor as the
    # PIL image itself, whose own RGB conversion composites transparency onto white (load_image's
    # image.convert("RGB") would keep the colour stored under transparent pixels; qwen-omni-utils'
    # to_rgb, which Qwen's and ms-swift's pipelines use, composites onto white as the processor does).
    out["image_files"] = [image(ImageOps.exif_transpose(Image.open(p))) for p in req.get("image_files", [])]

    # videos: the processor's own _process_videos (its class-level size override, fps -> second_per_grid)
    me = types.SimpleNamespace(video_processor=vp, replace_video_token=lambda *a, **k: "")
    out["videos"] = []
    for frames, fps in req.get("videos", []):
        kwargs = {"videos_kwargs": {**Qwen3OmniMoeProcessor.videos_kwargs, "fps": fps, "return_tensors": "pt"},
                  "load_audio_from_video": False}
        r, _ = Qwen3OmniMoeProcessor._process_videos(me, [frames], **kwargs)
        out["videos"].append((r["pixel_values_videos"], tuple(r["video_grid_thw"][0].tolist()),
                              float(r["video_second_per_grid"][0])))

    # audio in video: replace_video_with_audio_token on a stand-in self; one letter per token
    fake = types.SimpleNamespace(video_processor=types.SimpleNamespace(merge_size=2), audio_bos_token="",
                                 audio_eos_token="", video_token="V", audio_token="A")
    out["interleave"] = [
        Qwen3OmniMoeProcessor.replace_video_with_audio_token(
            fake, {"video_grid_thw": [torch.tensor(grid)], "video_second_per_grid": [spg]}, 0,
            {"num_audio_tokens": [n_audio]}, 0, position_id_per_seconds=Qwen3OmniMoeProcessor.position_id_per_seconds)
        for grid, spg, n_audio in req.get("interleave", [])
    ]
    out["video_size_override"] = dict(Qwen3OmniMoeProcessor.videos_kwargs["size"])
    return out


def reference(requests: dict, workdir) -> dict:
    """compute(requests) in a fresh interpreter; inputs and outputs travel as torch.save files."""
    import torch

    src, dst = os.path.join(workdir, "hf_in.pt"), os.path.join(workdir, "hf_out.pt")
    torch.save(requests, src)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), src, dst], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"HF reference run failed:\n{done.stderr[-4000:]}")
    return torch.load(dst, weights_only=False)


if __name__ == "__main__":
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.save(compute(torch.load(sys.argv[1], weights_only=False)), sys.argv[2])
