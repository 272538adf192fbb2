"""media.py against the transformers 5.24 processors (built from the released values), PyAV round trips,
the bundled omni sample, and the errors.

The HF side runs once, in a fresh interpreter (tests/hf_processors.py explains why); everything else
runs here. CPU only.
"""

import ast
import json
import math
import os
from fractions import Fraction

import numpy as np
import pytest
import torch

import media
from hf_processors import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")

# inputs, seeded: the same tensors go to HF (in the subprocess) and to media.py (here)
_rng = np.random.default_rng(0)
AUDIO = {  # name -> mono float32 16 kHz
    "0.5 s": (0.1 * _rng.standard_normal(8000)).astype(np.float32),
    "2.5 s": (0.3 * np.sin(np.arange(40000) * 2 * np.pi * 440 / 16000) + 0.01 * _rng.standard_normal(40000))
    .astype(np.float32),
    "16001 samples": (0.1 * _rng.standard_normal(16001)).astype(np.float32),
    "40 s": (0.05 * _rng.standard_normal(640000)).astype(np.float32),
}
# rows of several clips, handed to the processor in one call: a 5,170-sample clip beside a 19,757-sample one
# (ceil vs floor: one more token), a clip with L % 160 < 40 (its last frame over zeros), three clips
AUDIO_ROWS = [[(0.1 * _rng.standard_normal(n)).astype(np.float32) for n in lengths]
              for lengths in ((5170, 19757), (8020, 24000), (16001, 3300, 12345))]
_gen = torch.Generator().manual_seed(0)
IMAGE_SIZES = [(64, 96), (40, 40), (448, 448), (333, 517), (1, 150), (17, 3), (3000, 4500)]  # (H, W)
IMAGES = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=_gen) for h, w in IMAGE_SIZES]
VIDEOS = [  # (frames uint8 [T, 3, H, W], fps)
    (torch.randint(0, 256, (5, 3, 64, 96), dtype=torch.uint8, generator=_gen), 2.0),  # odd count, upscaled
    (torch.randint(0, 256, (4, 3, 360, 640), dtype=torch.uint8, generator=_gen), 1.0),
    (torch.randint(0, 256, (3, 3, 1080, 1920), dtype=torch.uint8, generator=_gen), 2.5),  # capped per frame
]
INTERLEAVE = [  # (video_grid_thw, second_per_grid, n_audio_tokens)
    ((2, 20, 28), 1.0, 26), ((3, 4, 4), 2.0, 50), ((5, 2, 2), 0.8, 30), ((6, 2, 4), 2 / 3, 40),
    ((1, 2, 2), 1.0, 0), ((4, 2, 4), 1.0, 5), ((2, 4, 6), 1.0, 200), ((7, 2, 2), 2 / 2.9, 61),
]
EXIF_JPEG = "exif_rot.jpg"  # written by the fixture


def _write_exif_jpeg(path):
    """Stored 40x20 (W x H): left half red, right half blue; EXIF orientation 6 = rotate 90 clockwise to view."""
    from PIL import Image

    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, quality=95, exif=exif)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    _write_exif_jpeg(tmp / EXIF_JPEG)
    files = [str(tmp / EXIF_JPEG)] + [os.path.join(DATA, "omni", n) for n in ("smiley.png", "hello_sign.png")]
    out = reference({"audio": list(AUDIO.values()), "audio_rows": AUDIO_ROWS, "audio_token_frames": list(range(3001)), "images": IMAGES,
                     "image_files": files, "videos": VIDEOS, "interleave": INTERLEAVE}, str(tmp))
    out["files"] = files
    return out


# --- audio ---------------------------------------------------------------------------------------


def test_mel_filter_bank_is_transformers(hf):
    assert media.mel_filter_bank().dtype == np.float64
    np.testing.assert_array_equal(media.mel_filter_bank(), hf["mel_bank"])


def test_log_mel_matches_whisper_feature_extractor(hf):
    for (name, wave), (ref, frames) in zip(AUDIO.items(), hf["audio"]):
        ours = media.log_mel(wave)
        assert ours.dtype == torch.float32 and ours.shape == ref.shape == (128, frames), name
        assert frames == media.audio_frame_count(len(wave)), name
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-4, (name, diff)  # measured: 0.0 (bit-identical)


def test_a_rows_clips_get_what_one_processor_call_gives_them(hf):
    """ms-swift hands all of a row's clips to the processor at once: padded to the longest, a
    shorter clip gets ceil(L/160) frames (5,170 samples: 33 frames and 5 tokens, alone 32 and 4)
    and a last frame computed over zeros. media.log_mel_row gives the processor's features, frame
    and token counts; alone, a clip's features differ."""
    for row, ref in zip(AUDIO_ROWS, hf["audio_rows"]):
        ours = media.log_mel_row(row)
        for i, (features, (want, frames, tokens)) in enumerate(zip(ours, ref)):
            assert features.shape == want.shape == (128, frames), (len(row[i]), features.shape, want.shape)
            assert media.audio_token_count(frames) == tokens
            diff = (features - want).abs().max().item()
            assert diff <= 1e-4, (len(row[i]), diff)  # measured: 0.0
    (_, long), ((_, frames, tokens), _) = media.log_mel_row(AUDIO_ROWS[0]), hf["audio_rows"][0]
    assert (frames, tokens) == (33, 5) and media.log_mel(AUDIO_ROWS[0][0]).shape[1] == 32
    assert torch.equal(long, media.log_mel(AUDIO_ROWS[0][1]))  # the longest clip: as alone
    alone, in_row = media.log_mel(AUDIO_ROWS[1][0]), media.log_mel_row(AUDIO_ROWS[1])[0]  # 8020 samples
    assert (alone.shape[1], in_row.shape[1]) == (50, 51)
    assert torch.equal(in_row[:, :49], alone[:, :49])  # windows inside the clip: the same
    assert not torch.equal(in_row[:, 49], alone[:, 49])  # its window reaches past the end: zeros, not reflection


def test_audio_token_count_matches_processor(hf):
    ours = [media.audio_token_count(n) for n in range(3001)]
    assert ours == [int(v) for v in hf["audio_tokens"]]
    assert [media.audio_token_count(100 * s) for s in (1, 2, 3, 4, 5)] == [13, 26, 39, 52, 65]
    assert media.audio_token_count(50) == 7 and media.audio_token_count(101) == 14


def test_load_audio_downmixes_and_resamples(tmp_path):
    import soundfile as sf
    import soxr

    t = np.arange(44100) / 44100
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.sin(2 * np.pi * 440 * t)], 1).astype(np.float32)
    sf.write(tmp_path / "s.wav", stereo, 44100, subtype="FLOAT")
    wave = media.load_audio(tmp_path / "s.wav")
    assert wave.dtype == np.float32 and wave.ndim == 1 and len(wave) == 16000
    np.testing.assert_array_equal(wave, soxr.resample(stereo.mean(1), 44100, 16000, quality="HQ"))
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 16000 / len(wave) - 440) <= 1  # still a 440 Hz tone, 0.375 amplitude
    assert abs(np.abs(wave[2000:-2000]).max() - 0.375) < 0.01
    # a 16 kHz mono FLAC is read as is (16-bit PCM -> float)
    clip = os.path.join(DATA, "omni", "weather.flac")
    np.testing.assert_array_equal(media.load_audio(clip), sf.read(clip, dtype="float32")[0])


# --- images --------------------------------------------------------------------------------------


def test_smart_resize_rules():
    assert media.smart_resize(224, 224) == (224, 224)
    assert media.smart_resize(1080, 1920) == (1088, 1920)
    assert media.smart_resize(3000, 4000) == (3008, 4000)  # 11750 tokens
    assert media.smart_resize(40, 40) == (64, 64)  # below min_pixels: grown
    assert media.smart_resize(48, 80) == (64, 64)  # banker's rounding: 1.5 -> 2, 2.5 -> 2
    video_size = dict(min_pixels=media.VIDEO_MIN_PIXELS, max_pixels=media.VIDEO_MAX_PIXELS)
    assert media.smart_resize(360, 640, **video_size) == (352, 640)
    assert media.smart_resize(64, 96, **video_size) == (320, 448)  # small frames are upscaled
    h, w = media.smart_resize(3000, 4500)  # above max_pixels: shrunk, floored
    assert h * w <= media.IMAGE_MAX_PIXELS and (h, w) == (2912, 4384)
    with pytest.raises(ValueError, match="aspect ratio"):
        media.smart_resize(1, 201)


def test_image_patches_match_qwen2vl_image_processor(hf):
    for (h, w), image, (ref, ref_grid) in zip(IMAGE_SIZES, IMAGES, hf["images"]):
        patches, grid = media.image_patches(image)
        assert grid == ref_grid, (h, w)
        assert patches.dtype == torch.float32 and patches.shape == ref.shape == (grid[1] * grid[2], 1536)
        diff = (patches - ref).abs().max().item()
        assert diff <= 1e-5, ((h, w), diff)  # measured: 0.0
        assert media.vision_token_count(grid) == grid[1] * grid[2] // 4
    # the two frames of each temporal patch are the same image
    p = media.image_patches(IMAGES[0])[0].view(-1, 3, 2, 16, 16)
    assert torch.equal(p[:, :, 0], p[:, :, 1])


def test_load_image_exif_alpha_and_files_match_processor(hf):
    image = media.load_image(hf["files"][0])  # EXIF orientation 6: stored 40x20, viewed 20x40
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 20)
    top, bottom = image[:, 5, 10].tolist(), image[:, 34, 10].tolist()
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red on top: upright
    smiley = media.load_image(hf["files"][1])  # RGBA: transparent corners become white
    assert smiley[:, 0, 0].tolist() == [255, 255, 255]
    for path, (ref, ref_grid) in zip(hf["files"], hf["image_files"]):
        patches, grid = media.image_patches(media.load_image(path))
        assert grid == ref_grid and (patches - ref).abs().max().item() <= 1e-5, path


# --- video ---------------------------------------------------------------------------------------


def test_video_patches_match_qwen2vl_video_processor(hf):
    override = {"shortest_edge": media.VIDEO_MIN_PIXELS, "longest_edge": media.VIDEO_MAX_PIXELS}
    assert hf["video_size_override"] == override  # Qwen3OmniMoeProcessor.videos_kwargs
    for (frames, fps), (ref, ref_grid, ref_spg) in zip(VIDEOS, hf["videos"]):
        patches, grid, spg = media.video_patches(frames, fps)
        assert grid == ref_grid and spg == ref_spg == 2 / fps, (frames.shape, grid, ref_grid)
        assert patches.shape == ref.shape == (grid[0] * grid[1] * grid[2], 1536)
        diff = (patches - ref).abs().max().item()
        assert diff <= 1e-5, (tuple(frames.shape), diff)  # measured: 0.0
    # 5 frames -> 3 slices; the last slice holds frame 4 twice
    patches, grid, _ = media.video_patches(VIDEOS[0][0], 2.0)
    last = patches.view(grid[0], -1, 3, 2, 16, 16)[-1]
    assert grid[0] == 3 and torch.equal(last[:, :, 0], last[:, :, 1])


def test_interleave_audio_in_video_matches_processor(hf):
    for (grid, spg, n_audio), ref in zip(INTERLEAVE, hf["interleave"]):
        runs = media.interleave_audio_in_video(grid, spg, n_audio)
        assert "".join(kind * count for kind, count in runs) == ref, (grid, spg, n_audio)
        assert all(count > 0 for _, count in runs) and all(a[0] != b[0] for a, b in zip(runs, runs[1:]))
    assert media.interleave_audio_in_video((2, 20, 28), 1.0, 26) == [("V", 140), ("A", 13), ("V", 140), ("A", 13)]


def _qwen_nframes(total, video_fps, fps=2.0):
    """qwen-omni-utils 0.0.9 smart_nframes, transcribed (FPS 2, MIN 4, MAX 768 frames, FRAME_FACTOR 2)."""
    min_frames = math.ceil(4 / 2) * 2
    max_frames = math.floor(min(768, total) / 2) * 2
    n = total / video_fps * fps
    n = min(min(max(n, min_frames), max_frames), total)
    return math.floor(n / 2) * 2


def test_sample_frame_indices_rule():
    for total, video_fps in [(8, 4), (25, 10), (30, 6), (3, 30), (2000, 30), (100000, 30), (7, 29.97), (61, 24)]:
        n = _qwen_nframes(total, video_fps)
        idx = media.sample_frame_indices(total, video_fps)
        assert idx == torch.linspace(0, total - 1, n).round().long().tolist() and len(idx) == n
    assert media.sample_frame_indices(8, 4) == [0, 2, 5, 7]
    assert len(media.sample_frame_indices(100000, 30)) == 768
    assert media.sample_frame_indices(1, 30) == [0]  # qwen-omni-utils raises; we keep the one frame


def _write_mp4(path, n_frames, fps, audio=None, size=(48, 64)):
    """Frame i is a flat grey of 9 * i + 10; audio: (wave float32 [channels, L], rate) as AAC."""
    import av

    h, w = size
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps, options={"crf": "10", "threads": "1"})
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        if audio is not None:
            wave, rate = audio
            aus = out.add_stream("aac", rate=rate, layout="stereo" if wave.shape[0] == 2 else "mono")
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 9 * i + 10, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in vs.encode(frame):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        if audio is not None:
            for start in range(0, wave.shape[1], 1024):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, start:start + 1024]), format="fltp",
                                                   layout=aus.layout.name)
                frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
                for packet in aus.encode(frame):
                    out.mux(packet)
            for packet in aus.encode():
                out.mux(packet)


def test_pyav_round_trip_frames_and_audio(tmp_path):
    rate = 44100
    t = np.arange(int(2.5 * rate)) / rate
    tone = np.stack([0.4 * np.sin(2 * np.pi * 1000 * t), 0.2 * np.sin(2 * np.pi * 1000 * t)]).astype(np.float32)
    _write_mp4(tmp_path / "v.mp4", 25, 10, audio=(tone, rate))
    video = media.load_video(tmp_path / "v.mp4")
    assert video.frames.dtype == torch.uint8 and video.frames.shape == (4, 3, 48, 64)
    assert video.fps == pytest.approx(4 / 25 * 10)
    decoded = [round((float(f.float().mean()) - 10) / 9) for f in video.frames]  # which source frame each is
    assert decoded == media.sample_frame_indices(25, 10) == [0, 8, 16, 24]

    wave = media.load_audio_from_video(tmp_path / "v.mp4")
    assert wave.dtype == np.float32 and wave.ndim == 1 and abs(len(wave) - 40000) <= 2048  # AAC frame padding
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 16000 / len(wave) - 1000) <= 2
    assert abs(np.abs(wave[4000:-4000]).max() - 0.3) < 0.03  # the channel mean of 0.4 and 0.2
    np.testing.assert_array_equal(media.load_audio(tmp_path / "v.mp4"), wave)  # soundfile cannot: PyAV fallback

    _write_mp4(tmp_path / "silent.mp4", 6, 3)  # 6 frames at 3 fps = 2 s -> 4 frames
    assert media.load_audio_from_video(tmp_path / "silent.mp4") is None
    assert media.load_video(tmp_path / "silent.mp4").frames.shape[0] == 4


def test_load_video_from_frame_files():
    names = ["red_circle.png", "red_circle.png", "red_circle.png"]
    video = media.load_video([os.path.join(DATA, "omni", n) for n in names], fps=1.0)
    assert video.fps == 1.0 and video.frames.shape == (3, 3, 192, 192)
    assert torch.equal(video.frames[0], media.load_image(os.path.join(DATA, "omni", names[0])))
    with pytest.raises(media.MediaError, match="differ in size"):
        media.load_video([os.path.join(DATA, "omni", "red_circle.png"), os.path.join(DATA, "omni", "stripes.png")])


# --- errors and packaging ------------------------------------------------------------------------


def test_media_errors_name_the_file_and_the_problem(tmp_path):
    import soundfile as sf
    from PIL import Image

    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not media at all" * 10)
    cases = [
        (lambda: media.load_image(tmp_path / "nope.png"), "file not found"),
        (lambda: media.load_audio(tmp_path / "nope.flac"), "file not found"),
        (lambda: media.load_video(tmp_path / "nope.mp4"), "file not found"),
        (lambda: media.load_image(junk), "cannot decode image"),
        (lambda: media.load_audio(junk), "cannot"),
        (lambda: media.load_video(junk), "cannot"),
    ]
    Image.new("RGB", (201, 1)).save(tmp_path / "thin.png")
    cases.append((lambda: media.load_image(tmp_path / "thin.png"), "aspect ratio"))
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    cases.append((lambda: media.load_audio(tmp_path / "empty.wav"), "audio is empty"))
    sf.write(tmp_path / "long.flac", np.zeros(32000, np.float32), 16000)
    cases.append((lambda: media.load_audio(tmp_path / "long.flac", max_seconds=1.0), "2.0 s long; the limit is 1 s"))
    sf.write(tmp_path / "track.flac", np.zeros(16000, np.float32), 16000)
    cases.append((lambda: media.load_video(tmp_path / "track.flac"), "no video stream"))
    for call, problem in cases:
        with pytest.raises(media.MediaError, match=problem) as e:
            call()
        assert str(e.value).startswith(str(tmp_path)), str(e.value)
    with pytest.raises(media.MediaError, match="video without frames"):
        media.video_patches(torch.zeros(0, 3, 64, 64, dtype=torch.uint8), name="clip.mp4")
    assert media.load_audio(tmp_path / "long.flac").shape == (32000,)


def test_missing_package_says_what_to_install(monkeypatch):
    import sys

    for module in ("soundfile", "PIL.Image", "av"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ImportError, match="reading audio files needs the 'soundfile' package: pip install soundfile"):
        media.load_audio(os.path.join(DATA, "omni", "weather.flac"))
    with pytest.raises(ImportError, match="images needs the 'Pillow' package: pip install Pillow"):
        media.load_image(os.path.join(DATA, "omni", "stripes.png"))
    with pytest.raises(ImportError, match="video needs the 'av' package: pip install av"):
        media.load_video(os.path.join(DATA, "omni", "ball.mp4"))
    # tensors need none of them
    assert media.image_patches(IMAGES[0])[1] == (1, 4, 6) and media.log_mel(AUDIO["0.5 s"]).shape == (128, 50)


def test_media_imports_only_torch_and_numpy_at_module_level():
    tree = ast.parse(open(os.path.join(ROOT, "media.py"), encoding="utf-8").read())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            top.add(node.module.split(".")[0])
    assert top <= {"__future__", "importlib", "math", "os", "re", "functools", "typing", "numpy", "torch"}, top
    names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    imported = {n.name for n in ast.walk(tree) if isinstance(n, ast.alias)}
    assert not any(s.startswith(("transformers", "torchvision")) for s in names | imported)


# --- the bundled sample --------------------------------------------------------------------------


def test_bundled_omni_sample_loads():
    folder = os.path.join(DATA, "omni")
    assert sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)) < 1.5e6
    rows = [json.loads(line) for line in open(os.path.join(DATA, "sample_omni.jsonl"), encoding="utf-8")]
    assert len(rows) >= 20
    seen = {"image": set(), "audio": set(), "video": set()}
    for row in rows:
        user, answer = row["messages"][-2], row["messages"][-1]
        assert user["role"] == "user" and answer["role"] == "assistant" and answer["content"].strip()
        assert "caption" in row or "transcript" in row
        if isinstance(user["content"], str):  # ms-swift: k-th tag <-> k-th list entry
            for kind in seen:
                paths = row.get(kind + "s", [])
                assert user["content"].count(f"<{kind}>") == len(paths), row
                seen[kind].update(paths)
        else:
            for item in user["content"]:
                if item["type"] != "text":
                    seen[item["type"]].add(item[item["type"]])
    assert all(seen.values()), seen
    for path in seen["image"]:
        image = media.load_image(os.path.join(DATA, path))
        assert 128 <= max(image.shape[1:]) <= 320
    for path in seen["audio"]:
        wave = media.load_audio(os.path.join(DATA, path))
        assert 1.0 <= len(wave) / 16000 <= 4.0, path
    for path in seen["video"]:
        video = media.load_video(os.path.join(DATA, path))
        assert video.frames.shape == (4, 3, 64, 96) and video.fps == 2.0
        assert 1.5 <= len(media.load_audio_from_video(os.path.join(DATA, path))) / 16000 <= 2.5
