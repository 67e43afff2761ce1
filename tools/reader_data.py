"""What the demo reader learns: signs with a short word or number, pictures of a coloured shape, clips that change
colour, the questions asked about them, and the held-out evaluation sets in TextVQA's and VideoBench's layouts.

Each picture or clip has one thing to tell (a sign's text, a shape's colour, the colour a clip ends with), so the
language model, learning from scratch in minutes, never has to choose between facts by the question's wording.

Every picture and clip is drawn from a numpy generator, so a seed names a data set. The prompts are the modeltest
harness's own (its TextVQA suffix, Video-Bench's multiple-choice text), so the model meets at evaluation exactly
what it was trained on.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
HARNESS_DIR = ROOT / "tests" / "modeltest"
sys.path[:0] = [str(ROOT), str(HARNESS_DIR)]

from atb_models.multimodal.media import count_video_frames  # noqa: E402
from modeltest.config import CONFIG_DIR  # noqa: E402
from modeltest.tasks.videobench import choice_prompt  # noqa: E402

# The TextVQA prompt suffix of the harness's model yaml, as every TextVQA question is asked there.
TEXTVQA_SUFFIX = yaml.safe_load((CONFIG_DIR / "model" / "qwen2_vl.yaml").read_text())["mm_model"]["prompt_suffix"]

# Alike in pairs (CAT/CAKE, STAR/STOP, RAIN/ROSE, BOOK/DOOR) so that reading, not guessing, gets them right.
WORDS = ("CAT", "DOG", "SUN", "SKY", "MOON", "STAR", "TREE", "BOOK", "FISH", "BIRD", "SHIP", "DOOR", "MILK", "LAMP",
         "CAKE", "FROG", "KING", "BELL", "KITE", "ROSE", "SNOW", "RAIN", "STOP", "OPEN")
NUMBERS = tuple(str(n) for n in range(10, 100))
COLOURS = {"red": (215, 35, 35), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (235, 205, 30),
           "orange": (240, 135, 20), "purple": (130, 50, 180), "pink": (240, 130, 190), "brown": (120, 75, 35)}
SHAPES = ("circle", "square", "triangle")
# Clips end in one of four colours, always offered as these options in this order.
CLIP_CHOICES = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}

READ_QUESTIONS = ("What is written in the image?", "What does the text in the image say?",
                  "Read the text in the image.", "What word or number is shown?")
COLOUR_QUESTIONS = ("What colour is the shape?", "What is the colour of the shape?")
END_QUESTION = "What colour does the video end with?"
SIGN_SHARE = 0.65  # of the pictures; the others show a shape

# Pictures: 4 to 6 merged tokens (28 pixels) wide, 2 or 3 high; the checkpoint's pixel bounds take them as they
# are (other pictures are resized into 4 to 64 tokens).
IMAGE_COLUMNS = (4, 6)
IMAGE_ROWS = (2, 3)
IMAGE_MIN_PIXELS = 28 * 28 * 4
IMAGE_MAX_PIXELS = 28 * 28 * 64
PATCH = 14
FONT_SIZE = 22
# Clips: 6 to 10 frames at 4 fps last at most 2.5 s, so both the kit's default 0.5 fps and the harness's 2 fps
# sample the same 4 frames, first and last included.
CLIP_FRAMES = (6, 10)
CLIP_FPS = 4.0
CLIP_SIZE = (64, 48)

# A seed's independent streams: training batches, held-out sets, the demo's sample picture and clip.
TRAINING_SEED_STREAM, HELDOUT_SEED_STREAM, SAMPLE_SEED_STREAM = 0, 1, 2
VIDEOBENCH_SUBSET = "TGIF"  # a Video-Bench subset name the harness knows; its clips are short animations too


TEXTS = WORDS + NUMBERS
ANSWERS = TEXTS + tuple(COLOURS)  # every fact a picture or clip tells, as the trainer's fact head numbers them


@dataclass
class Sample:
    request: list  # media item then text item, as LLM.generate takes it
    answer: str  # what the model must say, before <|im_end|>
    kind: str  # "image" or "video"
    labels: tuple  # what the medium shows, as ANSWERS indices: (text or colour,) or (start colour, end colour)


# ---------------------------------------------------------------------------------------------------- pictures

@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's embedded scalable font: nothing to download


def _jitter(rng: np.random.Generator, rgb: tuple, amount: int) -> tuple:
    return tuple(int(c) for c in np.clip(np.array(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255))


def draw_picture(rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """A light picture holding a dark word or number (a sign) or a coloured shape, and what it shows:
    {"sign": text} or {"shape": colour}.

    The sides are multiples of 28 pixels within the checkpoint's pixel bounds, so the image processor keeps the
    picture as drawn, and a sign's text starts on the 14-pixel patch grid in one font size: a vision tower learning
    from scratch in minutes needs glyphs that fall on its patches alike every time.
    """
    width = 28 * int(rng.integers(*IMAGE_COLUMNS, endpoint=True))
    height = 28 * int(rng.integers(*IMAGE_ROWS, endpoint=True))
    image = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(215, 256, 3)))
    draw = ImageDraw.Draw(image)
    if rng.random() < SIGN_SHARE:
        text = str(rng.choice(WORDS if rng.random() < 0.5 else NUMBERS))
        font = _font(FONT_SIZE)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = 2 + PATCH * int(rng.integers(0, (width - (right - left) - 4) // PATCH + 1))
        y = 2 + PATCH * int(rng.integers(0, (height - (bottom - top) - 4) // PATCH + 1))
        draw.text((x - left, y - top), text, font=font, fill=tuple(int(c) for c in rng.integers(0, 60, 3)))
        return image, {"sign": text}
    colour, shape, size = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), int(rng.integers(24, 41))
    x, y = int(rng.integers(2, width - size - 1)), int(rng.integers(2, height - size - 1))
    fill = _jitter(rng, COLOURS[colour], 15)
    if shape == "circle":
        draw.ellipse((x, y, x + size, y + size), fill=fill)
    elif shape == "square":
        draw.rectangle((x, y, x + size, y + size), fill=fill)
    else:
        draw.polygon([(x + size // 2, y), (x, y + size), (x + size, y + size)], fill=fill)
    return image, {"shape": colour}


def as_jpeg(image: Image.Image, quality: int) -> Image.Image:
    """The picture after a round trip through JPEG, as pictures on disk usually are."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def picture_question(rng: np.random.Generator, facts: dict) -> tuple[str, str]:
    """(question, answer) about a picture: a sign is read, a shape's colour named."""
    if "sign" in facts:
        return str(rng.choice(READ_QUESTIONS)), facts["sign"]
    return str(rng.choice(COLOUR_QUESTIONS)), facts["shape"]


def picture_labels(facts: dict) -> tuple:
    return (ANSWERS.index(facts.get("sign") or facts["shape"]),)


# ------------------------------------------------------------------------------------------------------- clips

def write_clip(path: Path, rng: np.random.Generator) -> dict:
    """An mp4 that shows one colour for its first half and another for the rest while a dark square crosses it."""
    num_frames = int(rng.integers(*CLIP_FRAMES, endpoint=True))
    start, end = (str(c) for c in rng.choice(list(CLIP_CHOICES.values()), size=2, replace=False))
    fills = [_jitter(rng, COLOURS[start], 12), _jitter(rng, COLOURS[end], 12)]
    width, height = CLIP_SIZE
    side = 10
    row = int(rng.integers(0, height - side))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), CLIP_FPS, (width, height))
    for index in range(num_frames):
        frame = np.empty((height, width, 3), np.uint8)
        frame[:] = fills[index >= num_frames // 2]
        x = index * (width - side) // (num_frames - 1)
        frame[row : row + side, x : x + side] = 30
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    if count_video_frames(path) != num_frames:
        raise RuntimeError(f"OpenCV wrote {path} but does not read back its {num_frames} frames")
    return {"start": start, "end": end}


def clip_question(facts: dict) -> tuple[str, str]:
    """Video-Bench's multiple-choice prompt on how the clip ends, and the letter that answers it."""
    letter = next(letter for letter, colour in CLIP_CHOICES.items() if colour == facts["end"])
    return choice_prompt(END_QUESTION, CLIP_CHOICES), letter


# ---------------------------------------------------------------------------------------------- training data

def training_sample(rng: np.random.Generator, kind: str, clip_path: Path) -> Sample:
    """One question about a fresh picture (plain, or with the harness's TextVQA suffix) or clip (written to
    clip_path)."""
    if kind == "image":
        image, facts = draw_picture(rng)
        if rng.random() < 0.7:
            image = as_jpeg(image, int(rng.integers(70, 96)))
        question, answer = picture_question(rng, facts)
        if rng.random() < 0.5:
            question += TEXTVQA_SUFFIX
        return Sample([{"image": image}, {"text": question}], answer, kind, picture_labels(facts))
    facts = write_clip(clip_path, rng)
    question, answer = clip_question(facts)
    labels = (ANSWERS.index(facts["start"]), ANSWERS.index(facts["end"]))
    return Sample([{"video": str(clip_path)}, {"text": question}], answer, kind, labels)


def tokenizer_corpus() -> str:
    """Text for the tokenizer beside its own corpus: every answer alone on a line, often enough to become one
    token (numbers stay digit by digit, as in Qwen2), and the prompts' recurring phrases."""
    answers = [*WORDS, *COLOURS]
    lines = [answer for answer in answers for _ in range(12)]
    questions = [*READ_QUESTIONS, *COLOUR_QUESTIONS]
    lines += [question + TEXTVQA_SUFFIX for question in questions for _ in range(4)]
    lines += [choice_prompt(END_QUESTION, CLIP_CHOICES)] * 4
    return "".join(line + "\n" for line in lines)


# ------------------------------------------------------------------------------------------ evaluation sets

def write_textvqa(folder: Path, rng: np.random.Generator, count: int) -> Path:
    """TextVQA in MindIE's layout: images/*.jpg, textvqa_val.jsonl and textvqa_val_annotations.json (ten
    annotators who all agree). Questions as the harness reads them, without its suffix."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines, annotations = [], []
    for number in range(count):
        image, facts = draw_picture(rng)
        name = f"images/reader_{number:03d}.jpg"
        image.save(folder / name, quality=90)
        question, answer = picture_question(rng, facts)
        question_id = 1000 + number
        lines.append(json.dumps({"image": name, "question": question, "question_id": question_id}))
        annotations.append({"question_id": question_id, "answers": [{"answer": answer.lower()}] * 10})
    questions = folder / "textvqa_val.jsonl"
    questions.write_text("".join(line + "\n" for line in lines))
    _write_json(folder / "textvqa_val_annotations.json", {"annotations": annotations})
    return questions


def write_videobench(folder: Path, rng: np.random.Generator, count: int) -> Path:
    """Video-Bench's layout: Eval_video/*.mp4, Eval_QA/TGIF_QA_new.json (how each clip ends, CLIP_CHOICES's four
    options), and Eval_QA/answer/ANSWER.json."""
    (folder / "Eval_video").mkdir(parents=True, exist_ok=True)
    eval_qa = folder / "Eval_QA"
    (eval_qa / "answer").mkdir(parents=True, exist_ok=True)
    questions, answers = {}, {}
    for number in range(count):
        name = f"Eval_video/reader_{number:03d}.mp4"
        facts = write_clip(folder / name, rng)
        letter = clip_question(facts)[1]
        question_id = f"{VIDEOBENCH_SUBSET}_reader_{number:03d}"
        questions[question_id] = {"vid_path": f"./{name}", "question": END_QUESTION, "choices": CLIP_CHOICES}
        answers[question_id] = {"answer": letter}
    _write_json(eval_qa / f"{VIDEOBENCH_SUBSET}_QA_new.json", questions)
    _write_json(eval_qa / "answer" / "ANSWER.json", {VIDEOBENCH_SUBSET: answers})
    return eval_qa


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------- scoring

# The harness's task yamls for the held-out sets (their local_dataset_path: the committed copies).
TASK_CONFIGS = {"textvqa": CONFIG_DIR / "task" / "reader_textvqa.yaml",
                "videobench": CONFIG_DIR / "task" / "reader_videobench.yaml"}
MODEL_CONFIG = CONFIG_DIR / "model" / "qwen2_vl.yaml"
MAX_NEW_TOKENS = 8  # the longest answer is three tokens and <|im_end|>


def harness_model(model_dir: Path):
    """The harness's model settings (its qwen2_vl.yaml) for the checkpoint in model_dir."""
    from modeltest.config import load_model_config

    return load_model_config(str(MODEL_CONFIG), str(model_dir))


def reference_backend(model):
    """The harness's transformers backend in float32 on the CPU: what `mm_run.sh --backend hf` runs."""
    from modeltest.backends import HFBackend
    from modeltest.config import TaskConfig

    limits = TaskConfig("reader", "", requested_max_input_length=1024, requested_max_output_length=MAX_NEW_TOKENS,
                        subject_mapping={})  # the backend reads only the input limit
    return HFBackend(model, limits, MAX_NEW_TOKENS, "float32", "cpu")


def score(task_name: str, dataset_path: Path, model, backend) -> tuple[float, list]:
    """The headline accuracy of `backend` on a held-out set, and the harness's per-sample results."""
    from modeltest.config import load_task_config
    from modeltest.evaluate import metric_rows, run_subset
    from modeltest.tasks import make_task

    task_config = load_task_config(str(TASK_CONFIGS[task_name]), str(dataset_path))
    task = make_task(task_config, model)
    results = [result for subset in task.subsets for result in run_subset(task, subset, backend, rank_zero=True)]
    return metric_rows(task, [(task.name, results)])[0].value, results
