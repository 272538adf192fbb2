"""data.py with media: row formats, placeholders and prompt ids against transformers'
Qwen3OmniMoeProcessor, media in batches, truncation, bad input, the inspect mode.

The processor comparison runs in a fresh interpreter (`python tests/test_omni_data.py IN OUT`), as
tests/hf_processors.py explains: transformers must see torchvision before anything imports it. Both
sides read the tiny tokenizer (tiny.py), whose special tokens carry the released ids.
"""
import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data", "sample_omni.jsonl")
OMNI = os.path.join(ROOT, "data", "omni")
KINDS = ("image", "audio", "video")

# ---- the transformers side (fresh interpreter) ----------------------------------------------------


def hf_side(requests: list[dict], tok_dir: str) -> list[dict]:
    """Qwen3OmniMoeProcessor on each prompt alone (one call per prompt, as ms-swift calls it)."""
    from hf_processors import FE_KW, IMG_KW, import_torchvision

    import_torchvision()
    from PIL import Image, ImageOps
    from transformers import (AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3OmniMoeProcessor,
                              WhisperFeatureExtractor)

    tok = AutoTokenizer.from_pretrained(tok_dir)  # its config names the media tokens for the processor
    proc = Qwen3OmniMoeProcessor(image_processor=Qwen2VLImageProcessor(**IMG_KW),
                                 video_processor=Qwen2VLVideoProcessor(**IMG_KW),
                                 feature_extractor=WhisperFeatureExtractor(**FE_KW), tokenizer=tok,
                                 chat_template=tok.chat_template)
    out = []
    for req in requests:
        text = proc.apply_chat_template(req["messages"], add_generation_prompt=True, tokenize=False)
        sound = {"load_audio_from_video": True, "audio_from_video_indices": req["audio_slots"]} if any(
            slot is not None for slot in req["audio_slots"]) else {}
        # images opened as transformers' load_image opens them (EXIF), handed over as PIL images
        r = proc(text=[text], images=[ImageOps.exif_transpose(Image.open(p)) for p in req["images"]] or None,
                 audio=req["audio"] or None, videos=req["videos"] or None, return_tensors="pt",
                 videos_kwargs={"fps": req["fps"], "cap_pixels_per_frame": False}, **sound)
        out.append(dict(r))
    return out


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    request = torch.load(sys.argv[1], weights_only=False)
    torch.save(hf_side(request["prompts"], request["tok_dir"]), sys.argv[2])
    sys.exit(0)


import media  # noqa: E402
from chat import EncodedExample, collate, encode_example, encode_examples, media_inputs, render_chat
from data import DataError, load_dataset_specs
from inspect_data import inspect_dataset


def run_hf(prompts, tok_dir, tmp):
    src, dst = os.path.join(tmp, "hf_in.pt"), os.path.join(tmp, "hf_out.pt")
    torch.save({"prompts": prompts, "tok_dir": str(tok_dir)}, src)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), src, dst], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(dst, weights_only=False)


# ---- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample():
    examples, _, stats = load_dataset_specs([SAMPLE], seed=0, split_ratio=0.0)
    return examples, stats


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def load(path, **kwargs):
    return load_dataset_specs([str(path)], seed=0, split_ratio=0.0, **kwargs)


# ---- every format parses the bundled sample -------------------------------------------------------


def parts_of(row):
    """A sample row's turns as [(role, [("text", t) | (kind, path), ...])] (tags resolved to entries)."""
    queues = {kind: list(row.get(kind + "s", [])) for kind in KINDS}
    turns = []
    for message in row["messages"]:
        content = message["content"]
        if isinstance(content, str):
            pieces = re.split(r"<(image|audio|video)>", content)
            parts = [(p, queues[p].pop(0)) if k % 2 else ("text", p) for k, p in enumerate(pieces)]
        else:
            parts = [("text", p["text"]) if p["type"] == "text" else (p["type"], p[p["type"]]) for p in content]
        turns.append((message["role"], [p for p in parts if p != ("text", "")]))
    return turns


def tagged(parts, lists):
    """ms-swift text: a tag per media part, its path appended to the row's list."""
    text = ""
    for kind, value in parts:
        if kind == "text":
            text += value
        else:
            text += f"<{kind}>"
            lists.setdefault(kind + "s", []).append(value.replace("omni/", "media/"))
    return text


def content_list(parts):
    return [{"type": "text", "text": v} if k == "text" else {"type": k, k: v.replace("omni/", "media/")}
            for k, v in parts]


def as_format(row, fmt):
    """The same conversation in another row format; media paths relative to a `media/` folder."""
    turns, lists = parts_of(row), {}
    extras = {k: row[k] for k in ("caption", "transcript") if k in row}
    sharegpt_role = {"user": "human", "assistant": "gpt", "system": "system"}
    if fmt == "alpaca":
        system = [tagged(p, lists) for r, p in turns if r == "system"]
        (_, user), (_, answer) = turns[-2:]
        return {**({"system": system[0]} if system else {}), "instruction": tagged(user, lists),
                "output": tagged(answer, lists), **lists, **extras}
    if fmt == "messages_tags":
        return {"messages": [{"role": r, "content": tagged(p, lists)} for r, p in turns], **lists, **extras}
    if fmt == "messages_parts":
        return {"messages": [{"role": r, "content": content_list(p) if r == "user" else tagged(p, lists)}
                             for r, p in turns], **extras}
    if fmt == "sharegpt_tags":
        return {"conversations": [{"from": sharegpt_role[r], "value": tagged(p, lists)} for r, p in turns],
                **lists, **extras}
    return {"conversations": [{"from": sharegpt_role[r], "value": content_list(p) if r == "user" else tagged(p, lists)}
                              for r, p in turns], **extras}


def test_sample_rows_and_shapes(sample, tok):
    examples, stats = sample
    assert stats["formats"] == {"messages": 24} and not stats["rows_skipped"] and len(examples) == 24
    kinds = Counter(item.kind for ex in examples for item in ex.media.values())
    assert kinds == {"image": 15, "audio": 10, "video": 3}
    for ex in examples:
        for item in ex.media.values():
            assert item.path.startswith(OMNI)
            if item.kind == "image":
                t, gh, gw = item.grid_thw
                assert t == 1 and item.pixels.shape == (gh * gw, 1536) and item.n_vision_tokens == gh * gw // 4
            elif item.kind == "audio":
                assert item.features.shape[0] == 128 and item.n_audio_tokens == media.audio_token_count(
                    item.features.shape[1])
            else:
                assert item.grid_thw == (2, 20, 28) and item.second_per_grid == 1.0 and item.features is None
    # a file shared by rows is read once: the rows hold the same object
    circles = {id(item) for ex in examples for key, item in ex.media.items() if key[1].endswith("red_circle.png")}
    assert len(circles) == 1
    two = next(ex for ex in examples if ex.caption and isinstance(ex.caption, list))
    assert [item.path.rsplit("/", 1)[-1] for item in two.media.values()] == ["red_circle.png", "stripes.png"]
    assert examples[6].transcript == "The weather is really nice today." and examples[0].caption.startswith("A red")
    encoded, _ = encode_examples(tok, examples, max_length=4096, max_completion_length=256)
    assert len(encoded) == 24


@pytest.mark.parametrize("fmt", ["alpaca", "messages_tags", "messages_parts", "sharegpt_tags", "sharegpt_parts"])
def test_every_format_parses_the_sample_with_paths_relative_to_the_file(sample, tok, tmp_path, fmt):
    examples, _ = sample
    rows = [json.loads(line) for line in open(SAMPLE, encoding="utf-8")]
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "media").symlink_to(OMNI)
    path = write_jsonl(folder / f"{fmt}.jsonl", [as_format(row, fmt) for row in rows])
    got, _, stats = load(path)
    assert stats["formats"] == {fmt.split("_")[0]: 24} and not stats["rows_skipped"]
    for ours, ref in zip(got, examples):
        assert all(item.path.startswith(str(folder / "media")) for item in ours.media.values())
        enc, ref_enc = (encode_example(tok, e, 4096, 256) for e in (ours, ref))
        assert (enc.student_prompt_ids, enc.completion_ids) == (ref_enc.student_prompt_ids, ref_enc.completion_ids)
        assert [m.kind for m in enc.student_media] == [m.kind for m in ref_enc.student_media]
        for a, b in zip(enc.student_media, ref_enc.student_media):
            for name in ("pixels", "features"):
                assert (getattr(a, name) is None) == (getattr(b, name) is None)
                assert getattr(a, name) is None or torch.equal(getattr(a, name), getattr(b, name))
        assert (ours.caption, ours.transcript) == (ref.caption, ref.transcript)


# ---- prompt ids and media equal the processor's -------------------------------------------------------

AIV_ROW = {"messages": [{"role": "system", "content": "Answer briefly."},
                        {"role": "user", "content": "<image>Earlier picture."},
                        {"role": "assistant", "content": "Noted."},
                        {"role": "user", "content": "<video>What does the voice say?"},
                        {"role": "assistant", "content": "The ball rolls to the right."}],
           "images": ["omni/smiley.png"], "videos": ["omni/ball.mp4"], "use_audio_in_video": True,
           "teacher_context": "The voice says: the ball rolls to the right."}


def hf_request(messages, use_audio_in_video):
    """One prompt for the processor: content-list messages and its media, in prompt order."""
    req = {"messages": [], "images": [], "audio": [], "audio_slots": [], "videos": [], "fps": 2.0}
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            req["messages"].append(message)
            continue
        req["messages"].append({"role": message["role"], "content": [
            p if p["type"] == "text" else {"type": p["type"]} for p in content]})
        for part in content:
            kind, path = part["type"], part.get(part["type"])
            if kind == "image":
                req["images"].append(path)
            elif kind == "audio":
                req["audio"].append(media.load_audio(path))
                req["audio_slots"].append(None)
            elif kind == "video":
                video = media.load_video(path)
                req["fps"] = video.fps
                if use_audio_in_video:
                    req["audio"].append(media.load_audio_from_video(path))
                    req["audio_slots"].append(len(req["videos"]))
                req["videos"].append(video.frames)
    return req


def test_prompt_ids_and_media_equal_the_processor(sample, tok, tiny_dir, tmp_path):
    examples, _ = sample
    aiv_path = write_jsonl(tmp_path / "aiv.jsonl", [{**AIV_ROW, "images": [os.path.join(OMNI, "smiley.png")],
                                                     "videos": [os.path.join(OMNI, "ball.mp4")]}])
    aiv, _, _ = load(aiv_path, teacher_system="You know the soundtrack.", teacher_sees_reference=True)
    rows = examples + aiv
    encoded = [encode_example(tok, ex, max_length=8192, max_completion_length=256) for ex in rows]
    prompts = [(ex.student_messages, enc.student_prompt_ids, enc.student_media, ex.use_audio_in_video)
               for ex, enc in zip(rows, encoded)]
    prompts += [(aiv[0].teacher_messages, encoded[-1].teacher_prompt_ids, encoded[-1].teacher_media, True)]
    hf = run_hf([hf_request(messages, use) for messages, _, _, use in prompts], tiny_dir, str(tmp_path))
    assert len(hf) == len(prompts) == 26
    placeholders = Counter()
    for (messages, ids, items, use), ref in zip(prompts, hf):
        assert ids == ref["input_ids"][0].tolist()
        placeholders.update(i for i in ids if i in (151655, 151656, 151675))
        ours = media_inputs([items])
        for name, key in (("pixel_values", "pixel_values"), ("pixel_values_videos", "pixel_values_videos")):
            if key in ref:
                assert (getattr(ours, name) - ref[key]).abs().max() <= 1e-5
            else:
                assert getattr(ours, name) is None
        for grid in ("image_grid_thw", "video_grid_thw"):
            assert (getattr(ours, grid) is None and grid not in ref) or torch.equal(getattr(ours, grid), ref[grid])
        if "video_grid_thw" in ref:
            assert ours.video_second_per_grid.tolist() == [float(v) for v in ref["video_second_per_grid"]]
            assert ours.use_audio_in_video == use
        if "input_features" in ref:  # one clip per prompt: no batch padding on the processor's side
            lens = ref["feature_attention_mask"].sum(-1)
            assert ours.audio_feature_lens.tolist() == lens.tolist() and len(lens) == 1
            assert (ours.input_features - ref["input_features"][0, :, :lens[0]]).abs().max() <= 1e-4
        else:
            assert ours.input_features is None
    assert placeholders[151655] > 0 and placeholders[151656] > 0 and placeholders[151675] > 0
    # the audio-in-video prompts interleave: <|vision_start|><|audio_start|> V.. A.. V.. A.. <|audio_end|><|vision_end|>
    student = prompts[-2][1]
    start = student.index(151669)
    assert student[start - 1] == 151652 and 151675 in student[start:] and 151656 in student[start:]


# ---- batches ---------------------------------------------------------------------------------------


def test_collate_mixed_text_and_media_rows_in_prompt_order(tok, tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"instruction": "Plain text question?", "output": "Plain answer."},
        {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "omni/weather.flac"},
                                                   {"type": "image", "image": "omni/smiley.png"},
                                                   {"type": "text", "text": "Both?"}]},
                      {"role": "assistant", "content": "Yes."}]},
        {"instruction": "<image>Left, <image> right.", "output": "Two.", "images": ["omni/stripes.png",
                                                                                     "omni/red_circle.png"]},
        {"conversations": [{"from": "human", "value": "<video><audio>Same voice?"}, {"from": "gpt", "value": "No."}],
         "videos": ["omni/ball.mp4"], "audios": ["omni/tea.flac"], "use_audio_in_video": True,
         "teacher_messages": [{"role": "user", "content": "<video>The clip says: the ball rolls to the right. "
                                                          "The recording says: I would like a cup of green tea. "
                                                          "Same voice?"}]},
    ])
    (tmp_path / "omni").symlink_to(OMNI)
    examples, _, stats = load(path)
    assert stats["formats"] == {"alpaca": 2, "messages": 1, "sharegpt": 1}
    encoded, _ = encode_examples(tok, examples, max_length=4096, max_completion_length=64)
    text_only = encode_example(tok, examples[0], 4096, 64)
    assert text_only.student_prompt_ids == tok.encode(render_chat(examples[0].student_messages, True))
    assert text_only.student_media == text_only.teacher_media == []
    batch = collate(encoded, tok.pad_id)
    m = batch.student_media
    by_name = {os.path.basename(item.path): item for ex in examples for item in ex.media.values()}
    images = [by_name[n] for n in ("smiley.png", "stripes.png", "red_circle.png")]
    assert torch.equal(m.pixel_values, torch.cat([i.pixels for i in images]))
    assert m.image_grid_thw.tolist() == [list(i.grid_thw) for i in images] and m.image_grid_thw.dtype == torch.long
    ball = by_name["ball.mp4"]
    assert torch.equal(m.pixel_values_videos, ball.pixels) and m.video_grid_thw.tolist() == [[2, 20, 28]]
    assert m.video_second_per_grid.tolist() == [1.0] and m.video_second_per_grid.dtype == torch.float32
    sounds = [by_name["weather.flac"].features, ball.features, by_name["tea.flac"].features]  # the track at the video
    assert torch.equal(m.input_features, torch.cat(sounds, dim=1))
    assert m.audio_feature_lens.tolist() == [s.shape[1] for s in sounds] and m.use_audio_in_video
    # every placeholder run has its item: counts in the padded ids equal the items' token counts
    ids = batch.student_prompt_ids
    img, vid, aud = (tok.tokenizer.token_to_id(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|audio_pad|>"))
    assert int((ids == img).sum()) == sum(i.n_vision_tokens for i in images)
    assert int((ids == vid).sum()) == ball.n_vision_tokens
    assert int((ids == aud).sum()) == sum(media.audio_token_count(s.shape[1]) for s in sounds)
    assert batch.student_prompt_mask[0, 0] == 0 and batch.student_prompt_ids[0, 0] == tok.pad_id  # left padding
    # the teacher of row 3 hears the transcript instead of the recording: its own media
    t = batch.teacher_media
    assert t.audio_feature_lens.tolist() == [s.shape[1] for s in sounds[:2]]
    assert [item.kind for item in encoded[3].teacher_media] == ["video"]
    assert collate(encoded[:1], tok.pad_id).student_media is None  # text-only batch: the text path
    assert collate([EncodedExample([1], [1], [2])], 0).teacher_media is None


# ---- truncation -----------------------------------------------------------------------------------


def test_truncation_never_cuts_a_media_span(tok, tmp_path):
    (tmp_path / "omni").symlink_to(OMNI)
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": [
        {"role": "system", "content": "You look at pictures."},
        {"role": "user", "content": "<image>First picture?"}, {"role": "assistant", "content": "A face."},
        {"role": "user", "content": "<image>And this one?"}, {"role": "assistant", "content": "A circle."}],
        "images": ["omni/smiley.png", "omni/red_circle.png"]}])
    [ex], _, _ = load(path)
    full = encode_example(tok, ex, 4096, 64)
    smiley, circle = full.student_media
    completion = len(full.completion_ids)
    start = full.student_prompt_ids.index(tok.tokenizer.token_to_id("<|vision_start|>"))
    # a cut 10 tokens into the first image: the whole image goes, and its item with it
    stats = Counter()
    enc = encode_example(tok, ex, len(full.student_prompt_ids) - start - 10 + completion, 64, stats)
    span = smiley.n_vision_tokens + 2
    assert enc.student_prompt_ids == full.student_prompt_ids[start + span:] and enc.student_media == [circle]
    assert stats["student_prompt_truncated"] == 1
    # a cut right before the image keeps it whole
    enc = encode_example(tok, ex, len(full.student_prompt_ids) - start + completion, 64)
    assert enc.student_prompt_ids == full.student_prompt_ids[start:] and enc.student_media == [smiley, circle]
    # the final turn's image does not fit: the row is skipped and counted
    turn_starts = [i for i, t in enumerate(full.student_prompt_ids) if t == tok.im_start_id]
    final = len(full.student_prompt_ids) - turn_starts[-2]  # the final user turn and the assistant header
    stats = Counter()
    assert encode_example(tok, ex, final + completion - 1, 64, stats) is None and stats["skipped_prompt_too_long"] == 1


# ---- bad input --------------------------------------------------------------------------------------

GOOD = {"instruction": "q", "output": "a"}


def bad_files(tmp_path):
    import av
    import numpy as np
    import soundfile as sf
    from PIL import Image

    (tmp_path / "junk.png").write_bytes(b"not an image at all" * 8)
    (tmp_path / "junk.wav").write_bytes(b"RIFF" + b"\x00" * 4 + b"WAVE" + b"not audio at all" * 8)
    Image.new("RGB", (201, 1)).save(tmp_path / "thin.png")
    sf.write(tmp_path / "long.wav", np.zeros(601 * 1000, np.float32), 1000, subtype="PCM_U8")  # 601 s at 1 kHz
    container = av.open(str(tmp_path / "empty.avi"), "w")  # a video stream that holds no frame
    stream = container.add_stream("mpeg4", rate=4)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    container.start_encoding()
    container.close()


def user(text, **lists):
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "a"}], **lists}


BAD_ROWS = [  # (row, media file named in the message or None, what the message says, skip reason)
    (user("<image>q", images=["nope.png"]), "nope.png", "file not found", "bad_media"),
    (user("<image>q", images=["junk.png"]), "junk.png", "cannot decode image", "bad_media"),
    (user("<image>q", images=["thin.png"]), "thin.png", "201x1 pixels is unusable", "bad_media"),
    (user("<audio>q", audios=["long.wav"]), "long.wav", "601.0 s long; the limit is 600 s", "bad_media"),
    (user("<audio>q", audios=["junk.wav"]), "junk.wav", r"cannot open as a media file \(Invalid data found", "bad_media"),
    (user("<video>q", videos=["empty.avi"]), "empty.avi", "video without frames", "bad_media"),
    (user("<image><image>q", images=["thin.png"]), "thin.png", r"2 <image> tag\(s\) in the text but 1 entries",
     "bad_media"),
    (user("q", audios=["long.wav"]), "long.wav", r"0 <audio> tag\(s\) in the text but 1 entries", "bad_media"),
    (user([{"type": "video", "video": ["omni/smiley.png"] * 2}, {"type": "text", "text": "q"}])
     | {"use_audio_in_video": True}, "smiley.png", "a video given as frames has no sound track", "bad_media"),
    (user("<image>q", images=["https://example.com/a.png"]), "https://example.com/a.png", "local files only",
     "bad_media"),
    (user("q <|image_pad|>"), None, r"holds <\|image_pad\|>, which only media may bring", "bad_media"),
    (user([{"type": "picture", "picture": "a.png"}]), None, "expected a part", "wrong_type"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<image>a"}],
      "images": ["thin.png"]}, None, "the assistant turn holds media", "bad_media"),
]


@pytest.mark.parametrize("row, file, problem, reason", BAD_ROWS)
def test_bad_media_rows_say_file_line_and_path(tmp_path, row, file, problem, reason):
    bad_files(tmp_path)
    (tmp_path / "omni").symlink_to(OMNI)
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, row])
    with pytest.raises(DataError) as e:
        load(path)
    message, fix = str(e.value).splitlines()  # the row, then the way on
    assert message.startswith(f"{path}:2: ") and re.search(problem, message), message
    assert "Errno" not in message  # FFmpeg's and the OS's error numbers are left out: words only
    assert fix == ("1 of 2 rows are bad: fix them, or pass --skip_bad_rows true to train without them (each skipped "
                   "row is then named in the log)")
    if file:
        assert file in message
    train, _, stats = load(path, skip_bad_rows=True)
    assert len(train) == 1 and stats["rows_skipped"] == {reason: 1} and stats["bad_rows"] == [message]


def test_every_bad_row_is_named_in_one_pass(tmp_path):
    """Without --skip_bad_rows every bad row of every file is reported at once (rows and media, a
    line each, up to 20 and then a count), not the first one alone; the last line names the way on."""
    from data import MAX_BAD_ROWS_SHOWN

    bad_files(tmp_path)
    first = write_jsonl(tmp_path / "a.jsonl", [GOOD, user("<image>q", images=["junk.png"]), {"messages": 3}, GOOD])
    second = write_jsonl(tmp_path / "b.jsonl", [user("<audio>q", audios=["junk.wav"])] * 30 + [GOOD])
    with pytest.raises(DataError) as e:
        load_dataset_specs([first, second], seed=0, split_ratio=0.0)
    lines = str(e.value).splitlines()
    assert len(lines) == MAX_BAD_ROWS_SHOWN + 2
    assert lines[0].startswith(f"{first}:3: ") and "messages" in lines[0]  # parse errors first, then media
    assert lines[1].startswith(f"{first}:2: ") and "junk.png: cannot decode image" in lines[1]
    assert all(line.startswith(f"{second}:") and "junk.wav: cannot open as a media file (Invalid data found" in line for line in lines[2:20])
    assert lines[-2:] == ["... and 12 more bad rows", "32 of 35 rows are bad: fix them, or pass --skip_bad_rows true "
                          "to train without them (each skipped row is then named in the log)"]


def test_missing_media_package_is_one_line_and_never_skipped(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, user("<image>q", images=[os.path.join(OMNI, "smiley.png")])])
    monkeypatch.setitem(sys.modules, "PIL.Image", None)  # makes `import PIL.Image` fail
    for skip in (False, True):
        with pytest.raises(DataError, match=rf"^{path}:2: images needs the 'Pillow' package: pip install Pillow") as e:
            load(path, skip_bad_rows=skip)
        assert "\n" not in str(e.value) and e.value.reason == "missing_package"


def test_text_rows_keep_tags_verbatim_and_media_rows_read_them(tok, tmp_path):
    (tmp_path / "omni").symlink_to(OMNI)
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "What does <image> mean in HTML-ish text?", "output": "A tag."},
        user("<image>What is it?", images=["omni/red_circle.png"]),
    ])
    (text, image), _, _ = load(path)
    assert text.student_messages == [{"role": "user", "content": "What does <image> mean in HTML-ish text?"}]
    assert text.media == {}
    assert image.student_messages[0]["content"] == [
        {"type": "image", "image": str(tmp_path / "omni" / "red_circle.png")}, {"type": "text", "text": "What is it?"}]


# ---- the inspect mode ----------------------------------------------------------------------------------


def test_inspect_prints_prompts_with_abbreviated_placeholders(tok, tiny_dir, tmp_path):
    text = inspect_dataset(SAMPLE, rows=24)
    assert "<|vision_start|><|image_pad|>x36<|vision_end|>What shape is in the picture?" in text
    circle, ball = os.path.join(OMNI, "red_circle.png"), os.path.join(OMNI, "ball.mp4")
    assert f"image {circle}: resized to 192x192, grid 1x12x12, pixel_values [144, 1536] -> 36 <|image_pad|>" in text
    assert "<|audio_start|><|audio_pad|>x22<|audio_end|>" in text and f"video {ball}: 2.00 s" in text
    assert "teacher prompt: the student's" in text and "transcript: The weather is really nice today." in text
    assert "<|image_pad|><|image_pad|>" not in text
    (tmp_path / "omni").symlink_to(OMNI)
    path = write_jsonl(tmp_path / "a.jsonl", [AIV_ROW, user("<image>q", images=["nope.png"])])
    text = inspect_dataset(path, tok, teacher_sees_reference=True)
    assert "(messages, use_audio_in_video)" in text and "its sound: input_features [128, 204] -> 27" in text
    assert ("<|vision_start|><|audio_start|><|video_pad|>x140<|audio_pad|>x13<|video_pad|>x140<|audio_pad|>x14"
            "<|audio_end|><|vision_end|>What does the voice say?") in text
    assert re.search(r"student prompt, \d+ tokens:", text) and "Here is a reference answer:" in text
    assert f"{path}:2: " in text and "nope.png: file not found  (skipped: bad_media)" in text
    cli = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "inspect", SAMPLE, "--rows", "1",
                          "--model", str(tiny_dir)], capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode == 0 and re.search(r"student prompt, \d+ tokens:", cli.stdout), cli.stderr


def test_only_the_drawn_rows_media_are_read(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, user("<image>q", images=["nope.png"])])
    outcomes = set()
    for seed in range(8):  # '#1' draws one of the two rows; the other one's file is never opened
        try:
            [ex], _, _ = load_dataset_specs([f"{path}#1"], seed=seed, split_ratio=0.0)
            outcomes.add(ex.source)
        except DataError as e:
            assert "nope.png: file not found" in str(e)
            outcomes.add("error")
    assert outcomes == {f"{path}:1", "error"}


def test_a_row_with_two_clips_gets_the_processors_token_counts(tmp_path, tok):
    """Two clips in one row are padded to the longer one, as one processor call does (ms-swift
    calls it per row): the 5,170-sample clip gets 33 frames and 5 <|audio_pad|> tokens, where alone
    (in another row) the same file gets 32 and 4. Features: media.log_mel_row's (test_media holds
    it to the processor)."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    waves = {"short.wav": 0.1 * rng.standard_normal(5170), "long.wav": 0.1 * rng.standard_normal(19757)}
    for name, wave in waves.items():
        sf.write(tmp_path / name, wave.astype(np.float32), 16000, subtype="FLOAT")
    path = write_jsonl(tmp_path / "rows.jsonl", [user("<audio><audio>q", audios=["short.wav", "long.wav"]),
                                                  user("<audio>q", audios=["short.wav"])])
    (both, alone), _, _ = load(path)
    want = media.log_mel_row([media.load_audio(str(tmp_path / n)) for n in waves])
    assert [item.features.shape[1] for item in both.media.values()] == [33, 123]
    assert all(torch.equal(item.features, w) for item, w in zip(both.media.values(), want))
    assert [item.n_audio_tokens for item in both.media.values()] == [5, 16]
    assert [item.n_audio_tokens for item in alone.media.values()] == [4]
    encoded, _ = encode_examples(tok, [both], max_length=256, max_completion_length=8)
    assert encoded[0].student_prompt_ids.count(tok.tokenizer.token_to_id("<|audio_pad|>")) == 5 + 16
