"""Generate the bundled omni sample: data/omni/ (images, speech, one video) and data/sample_omni.jsonl.

    apt-get install -y espeak-ng          # offline speech synthesis (espeak-ng 1.51 made the bundle)
    .venv/bin/pip install -r requirements-media.txt
    .venv/bin/python data/make_sample_omni.py

What it writes (all small, ~0.3 MB in total; rerunning rewrites the same files, byte for byte as long
as espeak-ng, libsndfile, soxr, Pillow and FFmpeg/PyAV keep their versions):

* omni/*.png    six 128..320 px pictures of shapes, colours and text drawn with Pillow (one RGBA with
                a transparent background, one tall, one wide), each with a caption (CAPTIONS).
* omni/*.flac   eight spoken sentences, 1..3 s, 16 kHz mono 16-bit FLAC: espeak-ng speech (22.05 kHz),
                silence trimmed, resampled with soxr; the sentence is the transcript (SPEECH).
* omni/ball.mp4 a red ball crossing a 96x64 frame in 8 frames at 4 fps (H.264) with a spoken AAC
                track (16 kHz mono) saying what happens: the audio-in-video case.

sample_omni.jsonl (paths relative to the jsonl file), 24 rows in two row formats:

* ms-swift rows: `messages` whose user text holds <image>, <audio>, <video> tags, and top-level
  `images` / `audios` / `videos` lists (the k-th tag of a kind is the k-th entry of its list).
* content-list rows: user `content` is a list of {"type": "image", "image": path},
  {"type": "audio", "audio": path}, {"type": "video", "video": path}, {"type": "text", "text": ...}.

Every row ends with an assistant answer. Privileged text for the teacher (the student sees only the
media): `caption` holds what the image or video shows, `transcript` what the audio (or the video's
audio track) says. Both are strings; a row with two images has a list of captions, in order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from fractions import Fraction

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "omni")
SR = 16000

CAPTIONS = {
    "red_circle.png": "A red circle on a white background.",
    "square_triangle.png": "A blue square to the left of a green triangle on a light grey background.",
    "hello_sign.png": 'The words "HELLO OMNI" in black capital letters on a yellow background.',
    "stripes.png": "Five horizontal stripes, from top to bottom: red, orange, yellow, green and blue.",
    "traffic_light.png": "A traffic light with the red lamp lit and the yellow and green lamps dark.",
    "smiley.png": "A yellow smiley face with two black eyes and a smile, on a white background.",
}

SPEECH = {
    "weather.flac": "The weather is really nice today.",
    "lights.flac": "Please turn off the lights in the kitchen.",
    "train.flac": "What time does the next train leave?",
    "tea.flac": "I would like a cup of green tea.",
    "shapes.flac": "The red circle is bigger than the blue square.",
    "sum.flac": "Seven plus five equals twelve.",
    "plants.flac": "Remember to water the plants on Sunday.",
    "describe.flac": "Can you describe what you see?",
}

VIDEO = "ball.mp4"
VIDEO_CAPTION = "A red ball moves from the left edge to the right edge of a light blue frame."
VIDEO_TRANSCRIPT = "The ball rolls to the right."


# --- images ------------------------------------------------------------------------------------


def draw_images() -> None:
    from PIL import Image, ImageDraw, ImageFont

    im = Image.new("RGB", (192, 192), "white")
    ImageDraw.Draw(im).ellipse((36, 36, 156, 156), fill=(220, 30, 30))
    im.save(os.path.join(OUT, "red_circle.png"))

    im = Image.new("RGB", (256, 160), (235, 235, 235))
    d = ImageDraw.Draw(im)
    d.rectangle((24, 40, 104, 120), fill=(30, 60, 210))
    d.polygon([(150, 120), (230, 120), (190, 40)], fill=(30, 160, 60))
    im.save(os.path.join(OUT, "square_triangle.png"))

    im = Image.new("RGB", (320, 128), (250, 215, 40))
    d = ImageDraw.Draw(im)
    d.text((160, 64), "HELLO OMNI", fill="black", font=ImageFont.load_default(size=40), anchor="mm")
    im.save(os.path.join(OUT, "hello_sign.png"))

    im = Image.new("RGB", (240, 240))
    d = ImageDraw.Draw(im)
    for i, colour in enumerate([(220, 30, 30), (245, 140, 20), (245, 220, 30), (40, 170, 60), (40, 80, 220)]):
        d.rectangle((0, 48 * i, 239, 48 * i + 47), fill=colour)
    im.save(os.path.join(OUT, "stripes.png"))

    im = Image.new("RGB", (128, 288), (200, 200, 200))
    d = ImageDraw.Draw(im)
    d.rounded_rectangle((24, 16, 104, 272), radius=14, fill=(40, 40, 40))
    for i, colour in enumerate([(240, 30, 30), (70, 60, 10), (10, 60, 20)]):
        d.ellipse((40, 28 + 82 * i, 88, 76 + 82 * i), fill=colour)
    im.save(os.path.join(OUT, "traffic_light.png"))

    im = Image.new("RGBA", (224, 224), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    d.ellipse((12, 12, 212, 212), fill=(250, 210, 30, 255), outline=(0, 0, 0, 255), width=4)
    d.ellipse((70, 70, 94, 100), fill=(0, 0, 0, 255))
    d.ellipse((130, 70, 154, 100), fill=(0, 0, 0, 255))
    d.arc((60, 90, 164, 170), start=20, end=160, fill=(0, 0, 0, 255), width=6)
    im.save(os.path.join(OUT, "smiley.png"))


# --- speech ------------------------------------------------------------------------------------


def speak(text: str) -> np.ndarray:
    """espeak-ng (US English, 165 words/min) -> float32 mono 16 kHz, leading/trailing silence trimmed."""
    import soundfile as sf
    import soxr

    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng not found: apt-get install -y espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "s.wav")
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "165", "-w", wav, text], check=True)
        wave, rate = sf.read(wav, dtype="float32")
    loud = np.flatnonzero(np.abs(wave) > 0.01)
    wave = wave[max(0, loud[0] - rate // 20) : loud[-1] + rate // 20]  # keep 50 ms around the speech
    return soxr.resample(wave, rate, SR, quality="HQ").astype(np.float32)


def write_speech() -> None:
    import soundfile as sf

    for name, text in SPEECH.items():
        sf.write(os.path.join(OUT, name), speak(text), SR, format="FLAC", subtype="PCM_16")


# --- video -------------------------------------------------------------------------------------


def write_video() -> None:
    """8 frames 96x64 at 4 fps (2 s), H.264 yuv420p, plus the spoken sentence as 16 kHz mono AAC."""
    import av

    fps, n_frames, w, h = 4, 8, 96, 64
    speech = speak(VIDEO_TRANSCRIPT)
    speech = np.pad(speech, (0, max(0, 2 * SR - len(speech))))[: 2 * SR]  # exactly the video's 2 s
    yy, xx = np.mgrid[0:h, 0:w]
    with av.open(os.path.join(OUT, VIDEO), "w", options={"fflags": "+bitexact"}) as out:
        vs = out.add_stream("libx264", rate=fps, options={"crf": "28", "preset": "slow", "threads": "1"})
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        aus = out.add_stream("aac", rate=SR, layout="mono")
        aus.bit_rate = 32000
        for i in range(n_frames):
            img = np.empty((h, w, 3), np.uint8)
            img[:] = (170, 210, 240)
            cx = 12 + i * (w - 24) / (n_frames - 1)
            img[(xx - cx) ** 2 + (yy - h / 2) ** 2 <= 10**2] = (220, 30, 30)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in vs.encode(frame):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        for start in range(0, len(speech), 1024):
            chunk = speech[start : start + 1024]
            frame = av.AudioFrame.from_ndarray(chunk[None], format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = SR, start, Fraction(1, SR)
            for packet in aus.encode(frame):
                out.mux(packet)
        for packet in aus.encode():
            out.mux(packet)


# --- rows --------------------------------------------------------------------------------------


def _p(name: str) -> str:
    return f"omni/{name}"


def _swift(user: str, answer: str, system: str | None = None, **extra) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages, **extra}


def _items(items: list, answer: str, **extra) -> dict:
    content = []
    for kind, value in items:
        content.append({"type": "text", "text": value} if kind == "text" else {"type": kind, kind: _p(value)})
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}], **extra}


def rows() -> list[dict]:
    c, s = CAPTIONS, SPEECH
    return [
        # ms-swift rows: tags in the text, media in top-level lists
        _swift("<image>What shape is in the picture?", "A red circle.",
               images=[_p("red_circle.png")], caption=c["red_circle.png"]),
        _swift("<image>Which shape is on the left?",
               "The blue square is on the left; the green triangle is on the right.",
               images=[_p("square_triangle.png")], caption=c["square_triangle.png"]),
        _swift("Read the sign: <image>", 'It says "HELLO OMNI".',
               images=[_p("hello_sign.png")], caption=c["hello_sign.png"]),
        _swift("<image>How many stripes are there, and what colour is the middle one?",
               "There are five stripes; the middle one is yellow.",
               images=[_p("stripes.png")], caption=c["stripes.png"]),
        _swift("<image>Should a car stop or go?", "Stop: the red lamp is lit.",
               images=[_p("traffic_light.png")], caption=c["traffic_light.png"],
               system="You are a driving instructor. Answer in one sentence."),
        _swift("<image>What emotion does this face show?", "Happiness: it is smiling.",
               images=[_p("smiley.png")], caption=c["smiley.png"]),
        _swift("<audio>What did the speaker say?", s["weather.flac"],
               audios=[_p("weather.flac")], transcript=s["weather.flac"]),
        _swift("<audio>What does the speaker want?", "They want the kitchen lights turned off.",
               audios=[_p("lights.flac")], transcript=s["lights.flac"]),
        _swift("<audio>Answer the question in the recording.",
               "I cannot see a timetable, so I do not know when the next train leaves; "
               "please check the station board.",
               audios=[_p("train.flac")], transcript=s["train.flac"]),
        _swift("<audio>Is the arithmetic in the recording correct?", "Yes: seven plus five is twelve.",
               audios=[_p("sum.flac")], transcript=s["sum.flac"]),
        _swift("<image><audio>Is the statement true for this picture?",
               "No: the picture shows a blue square and a green triangle, not a red circle.",
               images=[_p("square_triangle.png")], audios=[_p("shapes.flac")],
               caption=c["square_triangle.png"], transcript=s["shapes.flac"]),
        _swift("<image><image>Which of the two pictures has more colours?",
               "The second one: the stripes have five colours, the circle only red on white.",
               images=[_p("red_circle.png"), _p("stripes.png")],
               caption=[c["red_circle.png"], c["stripes.png"]]),
        _swift("<video>What happens in the video?", "A red ball moves from left to right.",
               videos=[_p(VIDEO)], caption=VIDEO_CAPTION, transcript=VIDEO_TRANSCRIPT),
        _swift("<video>Which way does the ball go, and what does the voice say?",
               'It goes to the right, and the voice says "The ball rolls to the right."',
               videos=[_p(VIDEO)], caption=VIDEO_CAPTION, transcript=VIDEO_TRANSCRIPT),
        # content-list rows
        _items([("image", "red_circle.png"), ("text", "Describe the picture in one sentence.")],
               "A red circle sits in the middle of a white background.", caption=c["red_circle.png"]),
        _items([("text", "What is written here?"), ("image", "hello_sign.png")], "HELLO OMNI.",
               caption=c["hello_sign.png"]),
        _items([("image", "traffic_light.png"), ("text", "Which lamp is on?")], "The red one, at the top.",
               caption=c["traffic_light.png"]),
        _items([("image", "smiley.png"), ("text", "What colour is the face?")], "Yellow.", caption=c["smiley.png"]),
        _items([("audio", "tea.flac"), ("text", "What drink is asked for?")], "A cup of green tea.",
               transcript=s["tea.flac"]),
        _items([("audio", "plants.flac"), ("text", "Transcribe the audio.")], s["plants.flac"],
               transcript=s["plants.flac"]),
        _items([("audio", "describe.flac"), ("image", "stripes.png")],
               "I see five horizontal stripes: red, orange, yellow, green and blue.",
               transcript=s["describe.flac"], caption=c["stripes.png"]),
        _items([("audio", "weather.flac"), ("text", "Is the speaker happy or unhappy about the weather?")],
               "Happy: they say the weather is really nice today.", transcript=s["weather.flac"]),
        _items([("video", VIDEO), ("text", "Describe the video.")],
               "A red ball rolls across a light blue background from left to right.",
               caption=VIDEO_CAPTION, transcript=VIDEO_TRANSCRIPT),
        _items([("image", "square_triangle.png"), ("audio", "shapes.flac"),
                ("text", "Does the recording match the picture?")],
               "No. The recording talks about a red circle, but the picture has a blue square and a green triangle.",
               caption=c["square_triangle.png"], transcript=s["shapes.flac"]),
    ]


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    draw_images()
    write_speech()
    write_video()
    with open(os.path.join(HERE, "sample_omni.jsonl"), "w", encoding="utf-8") as f:
        for row in rows():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"wrote {len(os.listdir(OUT))} files in {OUT} ({total / 1024:.0f} KiB) and {len(rows())} rows")


if __name__ == "__main__":
    main()
