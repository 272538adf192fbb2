"""Media for selfkd: audio, images and video turned into Qwen3-Omni thinker inputs.

No transformers and no torchvision at run time: what the released processor does
(Qwen3OmniMoeProcessor = WhisperFeatureExtractor + Qwen2VLImageProcessor + Qwen2VLVideoProcessor,
transformers 5.24, torchvision backend) is written out here with torch and numpy, and the tests
compare it with those classes.

Read top to bottom; each section builds on the one before:

1. Constants    -- the released preprocessor_config.json values and the processor's overrides.
2. Errors       -- MediaError, and the lazy imports of the optional media packages.
3. Audio        -- load_audio, log_mel, audio_token_count.
4. Images       -- load_image, smart_resize, resize_bicubic, image_patches.
5. Video        -- sample_frame_indices, load_video, video_patches, load_audio_from_video.
6. Audio in video -- interleave_audio_in_video: the order of video and audio placeholders.

Shapes: T frames, C = 3 channels, H x W pixels, gh x gw grid of 16x16 patches, gt = ceil(T / 2).

What a caller gets, per media item:

    audio  load_audio(path) -> wave [L] -> log_mel(wave) -> features [128, L // 160]
           tokens: audio_token_count(L // 160)                      (13 per second)
    image  load_image(path) -> uint8 [3, H, W] -> image_patches(...) -> [gh*gw, 1536], (1, gh, gw)
           tokens: vision_token_count((1, gh, gw)) = gh * gw // 4
    video  load_video(path) -> Video(frames uint8 [T, 3, H, W], fps)
           video_patches(frames, fps) -> [gt*gh*gw, 1536], (gt, gh, gw), seconds per grid
           tokens: vision_token_count((gt, gh, gw)) = gt * gh * gw // 4
    audio in video: load_audio_from_video(path) -> wave; interleave_audio_in_video(...) -> runs

Packages: torch and numpy always. Pillow (images), soundfile + soxr (audio files) and av (video,
and audio formats libsndfile cannot read) are imported inside the functions that need them, so a
text-only run imports this module without them (requirements-media.txt lists them).

Rules this module chooses (where the released pipelines differ or say nothing):

* One preprocessing pass, the HF processor's: an image or video is resized once, with the
  factor-32 smart_resize. ms-swift and qwen-omni-utils first resize with their own factor-28
  smart_resize and the processor then resizes again; we do not reproduce that double resize.
* Audio features are those of one processor call per row, as ms-swift calls it (all of a
  sample's sounds at once, video tracks included): the extractor pads the row's clips to the
  longest, which gives a shorter clip ceil(L/160) frames instead of floor (sometimes one more
  <|audio_pad|>) and a last frame over zeros (log_mel_row; data.py applies it per row). A clip
  alone in its row gets exactly log_mel.
* Video frames are sampled as qwen-omni-utils does (2 fps, 4..768 frames, an even count,
  linspace(...).round() indices); the HF video processor itself samples nothing.
* Loading audio equals librosa.load(path, sr=16000) (what qwen-omni-utils and ms-swift call) for
  files libsndfile reads: same decoder, channel mean, soxr "HQ" resampler.
* Transparent pixels become white, as the image processor's own RGB conversion and
  qwen-omni-utils' to_rgb do (transformers' load_image(path) instead keeps the colour stored
  under them, often black).
* Seconds per temporal grid = 2 / the fps the frames were really sampled at (1.0 s at 2 fps).
  The Qwen README recipe and ms-swift pass no fps, so the processor assumes 1 fps and gives 2.0 s
  although they sample at 2 fps; pass fps=1.0 to video_patches to reproduce that.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# 1. Constants
# ---------------------------------------------------------------------------------------------

# Audio: WhisperFeatureExtractor with the released preprocessor_config.json.
SAMPLING_RATE = 16000  # Hz; the model's only rate: every clip is resampled to it
N_FFT = 400  # 25 ms Hann window
HOP_LENGTH = 160  # 10 ms hop -> 100 feature frames per second
N_MELS = 128  # mel filters (= audio_config.num_mel_bins)
MEL_FMAX = 8000.0  # Hz; the bank spans 0 .. 8000 (Nyquist of 16 kHz)
MIN_AUDIO_SAMPLES = N_FFT // 2 + 1  # torch.stft's reflect padding needs more samples than 200

# Audio tokens: the encoder cuts the features into 100-frame chunks (n_window 50 * 2) and three
# stride-2 convolutions turn each full chunk into 13 tokens.
AUDIO_CHUNK_FRAMES = 100
AUDIO_TOKENS_PER_CHUNK = 13

# The longest clip accepted (audio files and video tracks). Not a model limit: the encoder's
# sinusoid table (max_source_positions 1500) is indexed per 100-frame chunk, so any length runs.
# The limit is the budget: 600 s = 60 000 frames = 7 800 audio tokens, already more than a training
# row's max_length usually holds, and the encoder's activations grow with it. Longer clips are
# almost always a data mistake (a whole podcast in one row); cut them first, or pass max_seconds.
MAX_AUDIO_SECONDS = 600.0

# Vision: Qwen2VLImageProcessor / Qwen2VLVideoProcessor with the released values.
PATCH_SIZE = 16  # pixels per patch side
TEMPORAL_PATCH_SIZE = 2  # frames per patch (an image is duplicated to fill both)
MERGE_SIZE = 2  # 2x2 patches merge into one LM token
RESIZE_FACTOR = PATCH_SIZE * MERGE_SIZE  # 32: resized sides are multiples of this
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1536 values per patch row
IMAGE_MEAN = 0.5  # all three channels
IMAGE_STD = 0.5
IMAGE_MIN_PIXELS = 3136  # size.shortest_edge (= 4 * 28 * 28, a qwen-omni-utils number)
IMAGE_MAX_PIXELS = 12845056  # size.longest_edge (= 16384 * 28 * 28): at most 12 544 tokens
# Qwen3OmniMoeProcessor overrides the video processor's size for every call (videos_kwargs):
VIDEO_MIN_PIXELS = 128 * 32 * 32  # 131072 per frame
VIDEO_MAX_PIXELS = 768 * 32 * 32  # 786432 per frame: at most 768 tokens per 2-frame slice
MAX_ASPECT_RATIO = 200  # smart_resize refuses longer/shorter side above this

# Video frame sampling (qwen-omni-utils fetch_video / smart_nframes).
VIDEO_FPS = 2.0  # frames sampled per second of video
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 768

# Positions: one temporal position id per 1/13 s; audio advances one per token (13 per second).
POSITION_ID_PER_SECONDS = 13


# ---------------------------------------------------------------------------------------------
# 2. Errors and optional packages
# ---------------------------------------------------------------------------------------------


class MediaError(ValueError):
    """A media file that cannot be used: missing, undecodable, too small, too long, empty.

    The message starts with the media path (callers prefix the dataset's file:line); `path` and
    `problem` are kept for callers that count skipped rows.
    """

    def __init__(self, path, problem: str):
        problem = re.sub(r"\[Errno -?\d+\] ", "", problem)  # FFmpeg's and the OS's error numbers: words only
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def _optional(module: str, package: str, purpose: str):
    """Import an optional media package, or say exactly what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{purpose} needs the '{package}' package: pip install {package} "
            f"(or pip install -r requirements-media.txt)"
        ) from e


def _check_exists(path) -> None:
    if not os.path.isfile(path):
        raise MediaError(path, "file not found" if not os.path.exists(path) else "not a regular file")


# ---------------------------------------------------------------------------------------------
# 3. Audio
# ---------------------------------------------------------------------------------------------


def _resample(wave: np.ndarray, rate: int, sr: int) -> np.ndarray:
    """Resample a mono float32 wave with soxr, as librosa.load's default (res_type "soxr_hq").

    soxr (libsoxr) is the resampler librosa itself defaults to: maintained, fast (C, SIMD) and
    high quality (steep anti-alias filter); it needs no scipy.
    """
    if rate == sr:
        return wave
    soxr = _optional("soxr", "soxr", "resampling audio")
    return soxr.resample(wave, rate, sr, quality="HQ").astype(np.float32, copy=False)


def _check_duration(path, n_samples: int, sr: int, max_seconds: float) -> None:
    if n_samples < MIN_AUDIO_SAMPLES:
        what = "no audio samples" if n_samples == 0 else f"only {n_samples} samples at {sr} Hz"
        raise MediaError(path, f"audio is empty ({what}; at least {MIN_AUDIO_SAMPLES} are needed)")
    if n_samples > max_seconds * sr:
        raise MediaError(
            path, f"audio is {n_samples / sr:.1f} s long; the limit is {max_seconds:g} s (MAX_AUDIO_SECONDS)"
        )


def load_audio(path, sr: int = SAMPLING_RATE, max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """Read an audio file -> float32 mono wave [L] at `sr` Hz, values in [-1, 1].

    soundfile (libsndfile) reads WAV, FLAC, OGG/Vorbis/Opus and MP3; other formats (m4a, aac,
    a video file's track) are decoded with PyAV if it is installed. Channels are averaged, then
    the wave is resampled with soxr when the file's rate differs from `sr`.
    """
    _check_exists(path)
    sf = _optional("soundfile", "soundfile", "reading audio files")
    try:
        with sf.SoundFile(path) as f:
            rate = f.samplerate
            if f.frames > max_seconds * rate:  # refuse before decoding an hour of audio
                _check_duration(path, f.frames, rate, max_seconds)
            data = f.read(dtype="float32", always_2d=True)  # [L, channels]
    except sf.SoundFileError as e:  # libsndfile cannot read this format (or the file)
        try:
            importlib.import_module("av")
        except ImportError:
            raise MediaError(path, f"cannot decode audio ({e}); pip install av to read other formats") from e
        wave = load_audio_from_video(path, sr=sr, max_seconds=max_seconds)
        if wave is None:
            raise MediaError(path, f"cannot decode audio ({e}) and PyAV finds no audio stream") from e
        return wave
    wave = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]  # [L]
    _check_duration(path, len(wave), rate, max_seconds)
    wave = _resample(np.ascontiguousarray(wave), rate, sr)
    _check_duration(path, len(wave), sr, max_seconds)
    return wave


# The mel filter bank, exactly as transformers.audio_utils.mel_filter_bank(num_frequency_bins=201,
# num_mel_filters=128, min_frequency=0, max_frequency=8000, sampling_rate=16000, norm="slaney",
# mel_scale="slaney") computes it, in numpy float64 (librosa's "slaney" bank).


def _hertz_to_mel(freq):
    """Slaney mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    min_log_hertz, min_log_mel, logstep = 1000.0, 15.0, 27.0 / np.log(6.4)
    mels = 3.0 * freq / 200.0
    if isinstance(freq, np.ndarray):
        log_region = freq >= min_log_hertz
        mels[log_region] = min_log_mel + np.log(freq[log_region] / min_log_hertz) * logstep
    elif freq >= min_log_hertz:
        mels = min_log_mel + np.log(freq / min_log_hertz) * logstep
    return mels


def _mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    min_log_hertz, min_log_mel, logstep = 1000.0, 15.0, np.log(6.4) / 27.0
    freq = 200.0 * mels / 3.0
    log_region = mels >= min_log_mel
    freq[log_region] = min_log_hertz * np.exp(logstep * (mels[log_region] - min_log_mel))
    return freq


@lru_cache(maxsize=1)
def mel_filter_bank() -> np.ndarray:
    """The released Whisper-style filter bank: float64 [201 frequency bins, 128 mel filters].

    128 triangles whose corners are equally spaced on the slaney mel scale between 0 and 8 kHz,
    each divided by its width in Hz ("slaney" area normalisation: equal energy per filter).
    """
    n_bins = 1 + N_FFT // 2  # 201 rfft bins, 0 .. 8000 Hz in 40 Hz steps
    mel_freqs = np.linspace(_hertz_to_mel(0.0), _hertz_to_mel(MEL_FMAX), N_MELS + 2)
    filter_freqs = _mel_to_hertz(mel_freqs)  # [130] triangle corners in Hz
    fft_freqs = np.linspace(0, SAMPLING_RATE // 2, n_bins)  # [201]
    filter_diff = np.diff(filter_freqs)  # [129]
    slopes = np.expand_dims(filter_freqs, 0) - np.expand_dims(fft_freqs, 1)  # [201, 130]
    down_slopes = -slopes[:, :-2] / filter_diff[:-1]  # rising edge of each triangle
    up_slopes = slopes[:, 2:] / filter_diff[1:]  # falling edge
    filters = np.maximum(np.zeros(1), np.minimum(down_slopes, up_slopes))  # [201, 128]
    enorm = 2.0 / (filter_freqs[2 : N_MELS + 2] - filter_freqs[:N_MELS])
    return filters * np.expand_dims(enorm, 0)


def log_mel(wave) -> torch.Tensor:
    """Whisper log-mel features of one clip: float32 [128, L // 160] (100 frames per second).

    Exactly WhisperFeatureExtractor (torch path) with the released settings, for one clip
    processed alone (padding=True, truncation=False: no padding, no 30 s cut):

        power = |stft(x, n_fft 400, hop 160, hann, center, reflect pad)|^2, last frame dropped
        mel   = filters.T @ power
        lg    = log10(max(mel, 1e-10));  lg = max(lg, lg.max() - 8);  feat = (lg + 4) / 4

    The floor keeps 80 dB below the clip's loudest bin. A batch axis of 1 is kept throughout, as
    the extractor does, so the matmul runs the same kernel and the result is bit-identical.
    """
    return log_mel_row([wave])[0]


def log_mel_row(waves: list) -> list[torch.Tensor]:
    """The log-mel features of a row's clips as the processor computes them in ONE call, which is
    how ms-swift feeds a row with several clips: every clip is right-padded with zeros to the
    longest, the features are those of the padded batch (the floor is per padded row), and clip i
    keeps the frames its sample mask covers, min(ceil(L_i / 160), L_max // 160). So a shorter clip
    gets ceil rather than floor frames (one more <|audio_pad|> for a 5,170-sample clip beside a
    19,757-sample one), and its last frame sees zeros where alone it would see reflect padding.
    One clip: [128, L // 160], as log_mel. Returns float32 [128, frames_i] per clip."""
    waves = [torch.as_tensor(np.asarray(w), dtype=torch.float32) for w in waves]
    for wave in waves:
        if wave.ndim != 1:
            raise ValueError(f"log_mel takes mono clips [L], got shape {tuple(wave.shape)}")
        if len(wave) < MIN_AUDIO_SAMPLES:
            raise MediaError("<audio>", f"audio has {len(wave)} samples; at least {MIN_AUDIO_SAMPLES} are needed")
    lengths = [len(w) for w in waves]
    x = torch.zeros(len(waves), max(lengths), dtype=torch.float32)  # [N, L_max], zero-padded on the right
    for row, wave in zip(x, waves):
        row[:len(wave)] = wave
    stft = torch.stft(x, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()  # [N, 201, L_max // 160]
    filters = torch.from_numpy(mel_filter_bank()).to(torch.float32)  # [201, 128]
    mel = filters.T @ power  # [N, 128, L_max // 160]
    lg = torch.clamp(mel, min=1e-10).log10()
    lg = torch.maximum(lg, lg.max(dim=2, keepdim=True)[0].max(dim=1, keepdim=True)[0] - 8.0)
    feats = (lg + 4.0) / 4.0
    return [feats[i, :, :min(-(-n // HOP_LENGTH), max(lengths) // HOP_LENGTH)] for i, n in enumerate(lengths)]


def audio_frame_count(n_samples: int) -> int:
    """Feature frames of a clip of n_samples (alone): one per 160-sample hop, the last dropped."""
    return n_samples // HOP_LENGTH


def audio_token_count(n_frames: int) -> int:
    """Audio placeholder tokens for n_frames feature frames (the processor's helper, n_window 50).

    Each full 100-frame chunk gives 13 tokens; a partial chunk of r frames goes through the
    three stride-2 convolutions (kernel 3, padding 1): r -> ceil(r/2) -> ceil(./2) -> ceil(./2).
    0.5 s -> 7 tokens, 1 s -> 13, 1.01 s -> 14.
    """
    halve = lambda n: (n - 1) // 2 + 1  # noqa: E731  one Conv2d(k=3, s=2, p=1) along time
    rest = n_frames % AUDIO_CHUNK_FRAMES
    return (n_frames // AUDIO_CHUNK_FRAMES) * AUDIO_TOKENS_PER_CHUNK + (halve(halve(halve(rest))) if rest else 0)


# ---------------------------------------------------------------------------------------------
# 4. Images
# ---------------------------------------------------------------------------------------------


def smart_resize(
    height: int,
    width: int,
    factor: int = RESIZE_FACTOR,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
) -> tuple[int, int]:
    """The resized (height, width): multiples of `factor`, min..max pixels, aspect kept.

    Qwen2-VL's smart_resize as transformers 5.24 has it: round each side to the nearest
    multiple of 32 (Python's round: halves go to the even multiple, 48 -> 64, 80 -> 64); if that
    is too large, shrink both sides by the same factor and floor them (never below 32); if too
    small (a side may even round to 0), grow them and ceil. Raises ValueError beyond 200:1.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image has no pixels ({height}x{width})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _pil_to_rgb_tensor(image) -> torch.Tensor:
    """PIL image -> uint8 [3, H, W], transparency composited onto white (transformers' convert_to_rgb)."""
    pil = _optional("PIL.Image", "Pillow", "images")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        image = image.convert("RGBA")
        white = pil.new("RGBA", image.size, (255, 255, 255, 255))
        image = pil.alpha_composite(white, image).convert("RGB")
    else:
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # [3, H, W]


def load_image(path) -> torch.Tensor:
    """Read an image file -> uint8 [3, H, W] RGB, upright.

    As the image processor sees a PIL image opened the way transformers' load_image opens it:
    the EXIF orientation is applied (a phone photo stored sideways comes out as it was taken),
    transparency is composited onto white, other modes (grey, palette, CMYK) become RGB. Also checks that smart_resize accepts the size,
    so a degenerate image fails here with its path.
    """
    _check_exists(path)
    pil = _optional("PIL.Image", "Pillow", "images")
    ops = _optional("PIL.ImageOps", "Pillow", "images")
    try:
        with pil.open(path) as im:
            im = ops.exif_transpose(im)
            im.load()
            image = _pil_to_rgb_tensor(im)
    except (pil.UnidentifiedImageError, pil.DecompressionBombError, OSError, SyntaxError) as e:
        raise MediaError(path, f"cannot decode image ({e})") from e
    try:
        smart_resize(image.shape[1], image.shape[2])
    except ValueError as e:
        raise MediaError(path, f"image of {image.shape[2]}x{image.shape[1]} pixels is unusable: {e}") from e
    return image


def resize_bicubic(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> uint8 [..., 3, height, width]: torchvision's v2 resize, BICUBIC, antialias.

    What torchvision.transforms.v2.functional.resize (0.28) does with a uint8 tensor: on CPU it
    hands the uint8 tensor straight to F.interpolate(mode="bicubic", align_corners=False,
    antialias=True), torch's native uint8 kernel (a float32 detour gives other pixels: up to 21
    of 255 levels apart on a noise image); elsewhere (GPU) it goes through float32, clamps to
    0..255 (bicubic overshoots at edges), rounds half to even and casts back. Same size in, same
    tensor out. Inputs are made contiguous first, as the processor's are.
    """
    *lead, c, h, w = images.shape
    if (h, w) == (height, width):
        return images
    x = images.reshape(-1, c, h, w).contiguous()  # [N, 3, H, W]
    if x.device.type == "cpu":
        x = F.interpolate(x, size=[height, width], mode="bicubic", align_corners=False, antialias=True)
    else:
        x = F.interpolate(x.to(torch.float32), size=[height, width], mode="bicubic", align_corners=False,
                          antialias=True)
        x = x.clamp_(min=0, max=255).round_().to(torch.uint8)
    return x.reshape(*lead, c, height, width)


def _patchify(frames: torch.Tensor) -> torch.Tensor:
    """Normalised frames float32 [T (even), 3, h, w] -> patch rows [T/2 * gh * gw, 1536].

    Rows: temporal slice, then 2x2 merge blocks (block row, block column), then the 4 patches of
    a block row-major; each row flattened as (channel, frame-in-slice, 16, 16). The vision tower
    merges each run of 4 consecutive rows into one LM token.
    """
    t, c, h, w = frames.shape
    gt, gh, gw, p, m = t // TEMPORAL_PATCH_SIZE, h // PATCH_SIZE, w // PATCH_SIZE, PATCH_SIZE, MERGE_SIZE
    x = frames.view(gt, TEMPORAL_PATCH_SIZE, c, gh // m, m, p, gw // m, m, p)
    # (gt, T2, C, bh, mh, ph, bw, mw, pw) -> (gt, bh, bw, mh, mw, C, T2, ph, pw)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, PATCH_DIM)


def _normalise(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 (x - 127.5) / 127.5: rescale 1/255 and normalise (0.5, 0.5) fused, as HF does."""
    mean, std = IMAGE_MEAN * 255.0, IMAGE_STD * 255.0
    return (images_u8.to(torch.float32) - mean) / std


def _as_chw_uint8(image, name: str) -> torch.Tensor:
    x = torch.as_tensor(image)
    if x.dtype != torch.uint8 or x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"{name}: expected uint8 [3, H, W] (load_image gives one), got {x.dtype} {tuple(x.shape)}")
    return x.contiguous()


def image_patches(
    image, min_pixels: int = IMAGE_MIN_PIXELS, max_pixels: int = IMAGE_MAX_PIXELS, name: str = "<image>"
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 [3, H, W] -> (pixel_values float32 [gh*gw, 1536], image_grid_thw (1, gh, gw)).

    Qwen2VLImageProcessor: smart_resize to (16*gh, 16*gw), bicubic antialiased resize, (x-127.5)/127.5,
    and the image duplicated into both frames of the temporal patch. It becomes gh*gw/4 LM tokens
    (vision_token_count). `name` (the path) goes into the MediaError of an unusable size.
    """
    x = _as_chw_uint8(image, name)
    try:
        h, w = smart_resize(x.shape[1], x.shape[2], RESIZE_FACTOR, min_pixels, max_pixels)
    except ValueError as e:
        raise MediaError(name, f"image of {x.shape[2]}x{x.shape[1]} pixels is unusable: {e}") from e
    x = _normalise(resize_bicubic(x, h, w))  # [3, h, w]
    frames = x[None].expand(TEMPORAL_PATCH_SIZE, -1, -1, -1)  # [2, 3, h, w], same frame twice
    return _patchify(frames), (1, h // PATCH_SIZE, w // PATCH_SIZE)


def vision_token_count(grid_thw) -> int:
    """LM placeholder tokens of an image or video: t * gh * gw / 4 (2x2 patches per token)."""
    t, gh, gw = (int(v) for v in grid_thw)
    return t * gh * gw // (MERGE_SIZE * MERGE_SIZE)


# ---------------------------------------------------------------------------------------------
# 5. Video
# ---------------------------------------------------------------------------------------------


class Video(NamedTuple):
    frames: torch.Tensor  # uint8 [T, 3, H, W], RGB
    fps: float  # sampled frames per second of the source (pass it to video_patches)


def sample_frame_indices(total_frames: int, video_fps: float, fps: float = VIDEO_FPS) -> list[int]:
    """Which frames of a video to keep: qwen-omni-utils' rule (smart_nframes + linspace).

        n = total / video_fps * fps                  frames at `fps` per second of video,
        n = min(max(n, 4), floor2(min(768, total)), total),  then floored to an even number,
        indices = torch.linspace(0, total - 1, n).round()   (evenly spread, first and last kept)

    So 2 fps, at least 4 and at most 768 frames, never more than the video has. qwen-omni-utils
    raises for a video of one frame; we keep that one frame (video_patches repeats it).
    """
    if total_frames <= 0:
        raise ValueError("a video needs at least one frame")
    if total_frames == 1:
        return [0]
    floor2 = lambda v: math.floor(v / TEMPORAL_PATCH_SIZE) * TEMPORAL_PATCH_SIZE  # noqa: E731
    n = total_frames / video_fps * fps
    n = min(max(n, VIDEO_MIN_FRAMES), floor2(min(VIDEO_MAX_FRAMES, total_frames)), total_frames)
    n = floor2(n)
    return torch.linspace(0, total_frames - 1, n).round().long().tolist()


def _open_av(path, purpose: str):
    av = _optional("av", "av", purpose)
    _check_exists(path)
    try:
        return av, av.open(str(path))
    except av.error.FFmpegError as e:
        raise MediaError(path, f"cannot open as a media file ({e})") from e


def load_video(path_or_frames, fps: float = VIDEO_FPS) -> Video:
    """A video file (decoded with PyAV) or a list of frame image paths -> Video(frames, fps).

    A file: every frame is counted, `sample_frame_indices` picks ~`fps` frames per second, those are
    decoded to RGB uint8 [T, 3, H, W]; `Video.fps` is the rate actually sampled, n / total *
    source_fps, as qwen-omni-utils reports it (about `fps`). A list of image paths: the frames are
    taken as already sampled at `fps`; all must have one size. Rotation metadata is not applied.
    """
    if isinstance(path_or_frames, (list, tuple)):
        if not path_or_frames:
            raise MediaError("<video>", "the frame list is empty")
        frames = [load_image(p) for p in path_or_frames]
        if any(f.shape != frames[0].shape for f in frames):
            sizes = sorted({f"{f.shape[2]}x{f.shape[1]}" for f in frames})
            raise MediaError(path_or_frames[0], f"video frames differ in size ({', '.join(sizes)})")
        return Video(torch.stack(frames), float(fps))

    path = path_or_frames
    av, container = _open_av(path, "video")
    with container:  # pass 1: count the frames (demuxing only) and read the frame rate
        if not container.streams.video:
            raise MediaError(path, "no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        try:
            total = sum(1 for packet in container.demux(stream) if packet.size > 0)
        except av.error.FFmpegError as e:
            raise MediaError(path, f"cannot read video ({e})") from e
    if total == 0:
        raise MediaError(path, "video without frames")
    if not rate:
        raise MediaError(path, "the video stream has no frame rate")
    video_fps = float(rate)
    indices = sample_frame_indices(total, video_fps, fps)
    wanted, kept, last = set(indices), {}, None
    av, container = _open_av(path, "video")
    with container:  # pass 2: decode up to the last wanted frame, keep the wanted ones as RGB
        try:
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if i in wanted:
                    kept[i] = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)  # [3, H, W]
                last = frame
                if i >= indices[-1]:
                    break
        except av.error.FFmpegError as e:
            raise MediaError(path, f"cannot decode video ({e})") from e
    if last is None:
        raise MediaError(path, "video without frames (none decodes)")
    # A stream that decodes fewer frames than it has packets: the missing tail repeats the last frame.
    tail = torch.from_numpy(last.to_ndarray(format="rgb24")).permute(2, 0, 1)
    frames = torch.stack([kept.get(i, tail) for i in indices]).contiguous()  # [T, 3, H, W]
    return Video(frames, len(indices) / total * video_fps)


def video_patches(
    frames,
    fps: float = VIDEO_FPS,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    name: str = "<video>",
) -> tuple[torch.Tensor, tuple[int, int, int], float]:
    """uint8 [T, 3, H, W] -> (pixel_values_videos float32 [gt*gh*gw, 1536], (gt, gh, gw), second_per_grid).

    Qwen2VLVideoProcessor called by Qwen3OmniMoeProcessor: every frame resized as an image, but
    with the processor's per-frame size (131072 .. 786432 pixels); an odd frame count gets its last
    frame repeated; two consecutive frames fill one temporal patch. `fps` is the rate the frames
    were sampled at: second_per_grid = 2 / fps, the seconds one temporal slice covers
    (video_second_per_grid; the model spaces slices 13 * second_per_grid position ids apart).
    Becomes gt*gh*gw/4 LM tokens.
    """
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name}: expected uint8 frames [T, 3, H, W], got {x.dtype} {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise MediaError(name, "video without frames")
    try:
        h, w = smart_resize(x.shape[2], x.shape[3], RESIZE_FACTOR, min_pixels, max_pixels)
    except ValueError as e:
        raise MediaError(name, f"video of {x.shape[3]}x{x.shape[2]} pixels is unusable: {e}") from e
    x = _normalise(resize_bicubic(x.contiguous(), h, w))  # [T, 3, h, w]
    if pad := -x.shape[0] % TEMPORAL_PATCH_SIZE:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])  # repeat the last frame
    grid = (x.shape[0] // TEMPORAL_PATCH_SIZE, h // PATCH_SIZE, w // PATCH_SIZE)
    return _patchify(x), grid, TEMPORAL_PATCH_SIZE / fps


def load_audio_from_video(
    path, sr: int = SAMPLING_RATE, max_seconds: float = MAX_AUDIO_SECONDS
) -> np.ndarray | None:
    """A media file's first audio stream, decoded with PyAV -> float32 mono wave [L] at `sr` Hz.

    For audio in video (and audio formats libsndfile cannot read). Decoded to float, channels
    averaged, resampled with soxr "HQ" as load_audio does. None when the file has no audio stream
    (a silent video: its placeholders are then plain video tokens).
    """
    av, container = _open_av(path, "decoding audio with PyAV")
    with container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        to_float = av.AudioResampler(format="fltp")  # planar float32, the stream's layout and rate
        chunks, n, rate = [], 0, stream.codec_context.sample_rate
        try:
            for frame in container.decode(stream):
                for f in to_float.resample(frame):
                    chunks.append(f.to_ndarray())  # [channels, n]
                    n, rate = n + f.samples, f.sample_rate
                if n > max_seconds * rate:  # stop decoding early
                    _check_duration(path, n, rate, max_seconds)
            for f in to_float.resample(None):  # flush
                chunks.append(f.to_ndarray())
        except av.error.FFmpegError as e:
            raise MediaError(path, f"cannot decode the audio stream ({e})") from e
    if not chunks:
        raise MediaError(path, "the audio stream is empty")
    data = np.concatenate(chunks, axis=1)  # [channels, L]
    wave = data.mean(axis=0, dtype=np.float32) if data.shape[0] > 1 else data[0].astype(np.float32)
    _check_duration(path, len(wave), rate, max_seconds)
    wave = _resample(np.ascontiguousarray(wave), rate, sr)
    _check_duration(path, len(wave), sr, max_seconds)
    return wave


# ---------------------------------------------------------------------------------------------
# 6. Audio in video
# ---------------------------------------------------------------------------------------------


def interleave_audio_in_video(
    video_grid_thw,
    second_per_grid: float,
    n_audio_tokens: int,
    position_id_per_seconds: float = POSITION_ID_PER_SECONDS,
) -> list[tuple[str, int]]:
    """The placeholder order of a video with its own audio track: runs [("V"|"A", count), ...].

    With audio in video, a video's single <|video_pad|> becomes
        <|vision_start|><|audio_start|> V.. A.. V.. A.. <|audio_end|><|vision_end|>
    where V = <|video_pad|> and A = <|audio_pad|>. Every token has a time in position ids: the
    tokens of temporal slice t at t * second_per_grid * 13, audio token k at k (13 per second).
    The processor merges the two lists by time, a video token first on a tie, so each slice
    (gh * gw / 4 tokens) is followed by the audio up to the next slice's start:

        slice t's video run is preceded by the audio tokens k < t * second_per_grid * 13.

    Example: grid (2, 20, 28) at 1.0 s per grid and 26 audio tokens -> V140 A13 V140 A13.
    """
    t, gh, gw = (int(v) for v in video_grid_thw)
    per_slice = gh * gw // (MERGE_SIZE * MERGE_SIZE)
    runs: list[tuple[str, int]] = []

    def emit(kind: str, count: int) -> None:
        if count <= 0:
            return
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1] + count)
        else:
            runs.append((kind, count))

    audio_done = 0
    for slice_index in range(t):
        start = slice_index * second_per_grid * position_id_per_seconds  # float, as the processor's
        before = min(n_audio_tokens, math.ceil(start))  # audio tokens k < start come first
        emit("A", before - audio_done)
        audio_done = max(audio_done, before)
        emit("V", per_slice)
    emit("A", n_audio_tokens - audio_done)
    return runs
